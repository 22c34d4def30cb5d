"""Diff of one edit: ‖Δ‖ per layer as a chart, the parameter table (norms, rank), prediction changes."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import streamlit as st
from torch import nn

from factedit.editing.specs import mlp_param_names, num_layers, spec_for
from factedit.session import EditSession

from .charts import layer_chart
from .ui import highlight_rows, token

SECTION = "diff"


def render_diff(service: EditSession) -> None:
    edit_id = st.session_state.get("diff_edit")
    if not edit_id:
        return
    title, close = st.columns([5, 1], vertical_alignment="bottom")
    title.subheader(f"Diff of edit {edit_id}")
    close.button("Hide diff", key="hide_diff", on_click=st.session_state.pop, args=("diff_edit", None))
    try:
        with st.spinner("Computing the diff…"):
            diff = service.diff(edit_id)
    except Exception as exc:
        st.error(f"Could not compute the diff of {edit_id}: {type(exc).__name__}: {exc}")
        return
    params = diff["params"]
    total = math.sqrt(sum(p["fro_norm"] ** 2 for p in params))
    st.markdown(f"**{len(params)}** parameter(s) changed · total ‖Δ‖\\_F **{total:.4g}** · "
                f"max rank **{max((p['rank'] for p in params), default=0)}**")
    st.markdown("**‖Δ‖\\_F per layer**")
    st.altair_chart(layer_chart(layer_norms(service.model, params)), width="stretch")
    st.table(param_frame(params))
    changes = prediction_frame(diff["predictions"], diff["probes"])
    st.markdown("**Prediction changes**: the edit's prompts before and after it was applied, then the "
                "probes scored now with and without this edit")
    st.table(highlight_rows(changes, "changed"))


def layer_of_params(model: nn.Module) -> dict[str, int]:
    """Parameter name -> block index, for the MLP matrices the model spec knows."""
    out: dict[str, int] = {}
    roles = spec_for(model).roles
    for layer in range(num_layers(model)):
        for name in mlp_param_names(model, [layer], roles):
            out[name] = layer
    return out


def layer_norms(model: nn.Module, params: list[dict[str, Any]]) -> pd.DataFrame:
    """‖Δ‖_F of each block (root of the summed squares of its parameters' norms), every block listed."""
    try:
        where = layer_of_params(model)
        n = num_layers(model)
    except Exception:
        return pd.DataFrame({"layer": [p["name"] for p in params], "norm": [p["fro_norm"] for p in params]})
    squares = [0.0] * n
    others = {}
    for p in params:
        if p["name"] in where:
            squares[where[p["name"]]] += p["fro_norm"] ** 2
        else:
            others[p["name"]] = p["fro_norm"]
    frame = pd.DataFrame({"layer": [str(i) for i in range(n)], "norm": [math.sqrt(s) for s in squares]})
    if others:
        frame = pd.concat([frame, pd.DataFrame({"layer": list(others), "norm": list(others.values())})])
    return frame


def param_frame(params: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([
        {"parameter": p["name"], "shape": "×".join(map(str, p["shape"])), "kind": p["kind"],
         "‖Δ‖_F": f"{p['fro_norm']:.4g}", "‖Δ‖/‖W‖": f"{p['relative_norm']:.3g}", "rank": p["rank"]}
        for p in params
    ])


def prediction_frame(predictions: list[dict[str, Any]], probes: list[dict[str, Any]]) -> pd.DataFrame:
    out = []
    for kind, row in [("edit", r) for r in predictions] + [("probe", r) for r in probes]:
        before, after = row["before"][0], row["after"][0]
        out.append({
            "prompt": row["prompt"],
            "kind": kind,
            "without the edit": f"{token(before['token'])} {before['prob']:.3f}",
            "with the edit": f"{token(after['token'])} {after['prob']:.3f}",
            "changed": "changed" if before["id"] != after["id"] else "",
        })
    return pd.DataFrame(out, columns=["prompt", "kind", "without the edit", "with the edit", "changed"])
