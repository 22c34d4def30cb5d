"""Diff of the selected edit: ‖Δ‖ per layer, the parameter table (norms, rank), and what it does on its
prompts and the probes, scored now without and with it (a reverted edit: re-applied on the current
weights), with the weights untouched. It always names the edit it shows and follows the selection."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import streamlit as st
from torch import nn

from factedit.model.specs import mlp_param_names, num_layers, spec_for
from factedit.session import EditSession

from .charts import layer_chart
from .preview_view import DEFAULT_THRESHOLD
from .ui import answer, flagged, highlight_rows, shift_text

SECTION = "diff"


def render_diff(service: EditSession, edit_id: str | None) -> None:
    if edit_id is None or not st.session_state.get("show_diff"):
        return
    status = next((r.status for r in service.history() if r.id == edit_id), "unknown")
    title, close = st.columns([5, 1], vertical_alignment="bottom")
    title.subheader(f"Diff of edit {edit_id} ({status})")
    close.button("Hide diff", key="hide_diff", on_click=st.session_state.update, kwargs={"show_diff": False})
    try:
        with st.spinner("Computing the diff…"):
            effect = service.effect(edit_id)
    except Exception as exc:
        st.error(f"Could not compute the diff of {edit_id}: {type(exc).__name__}: {exc}")
        return
    if effect["active"]:
        st.caption(f"Edit {edit_id} is active. “Without the edit”: the current weights without it (the other "
                   "active edits kept); “with the edit”: the model now.")
    else:
        st.info(f"Edit {edit_id} is not active (reverted). “Without the edit”: the model now; “with the edit”: "
                f"edit {edit_id} re-applied on the current weights, which shows what it does.")
    params = effect["params"]
    total = math.sqrt(sum(p["fro_norm"] ** 2 for p in params))
    st.markdown(f"**{len(params)}** parameter(s) changed · total ‖Δ‖\\_F **{total:.4g}** · "
                f"max rank **{max((p['rank'] for p in params), default=0)}** · "
                f"layers **{', '.join(map(str, effect['layers'])) or '-'}**")
    st.markdown("**‖Δ‖\\_F per layer**")
    st.altair_chart(layer_chart(layer_norms(service.model, params)), width="stretch")
    st.table(param_frame(params))
    threshold = st.session_state.get("probe_threshold", DEFAULT_THRESHOLD)
    st.markdown("**Prediction changes**: the edit's prompts and the probes, without and with the edit")
    st.table(highlight_rows(prediction_frame(effect["rows"], threshold), "changed"))


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


def prediction_frame(rows: list[dict[str, Any]], threshold: float) -> pd.DataFrame:
    out = []
    for row in rows:
        target = ""
        if row["target_before"] is not None:
            target = f"{row['target_before']:.3f} → {row['target_after']:.3f}"
        out.append({
            "prompt": row["prompt"],
            "kind": row["kind"],
            "without the edit": answer(row["before"]),
            "with the edit": answer(row["after"]),
            "p(target)": target,
            "largest change": shift_text(row),
            "changed": "top changed" if row["flipped"] else "moved" if flagged(row, threshold) else "",
        })
    columns = ["prompt", "kind", "without the edit", "with the edit", "p(target)", "largest change", "changed"]
    return pd.DataFrame(out, columns=columns)
