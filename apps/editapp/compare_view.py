"""Compare methods, a section with its own form: one fact, each chosen method's edit computed on the same
(current) weights and scored without being applied (EditSession.preview), side by side;
then apply one of them exactly as computed."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from factedit.editing.preview import EDIT, PARAPHRASE, EditPreview
from factedit.session import EditSession

from .actions import COMPARE as SECTION
from .actions import queue, run_pending
from .edit_view import STATUS_HEIGHT
from .methods import changed_settings, compare_default
from .preview_view import threshold
from .ui import HIGHLIGHT, answer, flagged, md, shift_text, show_messages, token


def render_compare(service: EditSession) -> None:
    """Its own section: a form (the fact, the methods), the status line under its button, the results."""
    st.subheader("Compare methods")
    st.caption("One fact, several methods: each edit is computed on the current weights and scored without "
               "being applied; then apply the one you prefer, exactly as computed.")
    with st.form("compare_form", border=True):
        left, right = st.columns(2)
        left.text_input("Prompt", value=service.config.example_prompt, key="compare_prompt")
        right.text_input("New target", value=service.config.example_target, key="compare_target")
        preselected = compare_default(service.methods, service.config.compare_methods)
        st.multiselect("Methods to compare", service.methods, default=preselected, key="compare_methods",
                       help="Each one is computed in turn; alphaedit and the side-module methods take longer. "
                            "The preselection is compare_methods in factedit/conf/app.yaml.")
        st.form_submit_button("Compare methods", key="compare", on_click=queue, args=("compare", SECTION))
    status = st.container(height=STATUS_HEIGHT, border=False).empty()
    run_pending(service, SECTION, status)
    show_messages(SECTION)
    comparison = st.session_state.get("comparison")
    if comparison:
        _results(service, comparison)


def _results(service: EditSession, comparison: dict[str, Any]) -> None:
    title, close = st.columns([5, 1], vertical_alignment="bottom")
    title.markdown(f"**Compared: {md(comparison['prompt'])} → {md(comparison['target'])}**")
    close.button("Close comparison", key="close_comparison", on_click=st.session_state.pop, args=("comparison", None))
    previews: dict[str, EditPreview] = comparison["previews"]
    stale = comparison["version"] != service.version
    if stale:
        st.info("The weights changed since this comparison (an edit or a revert): its edits were fitted to the "
                "weights as they were and can no longer be applied. Compare again.")
    for method, error in comparison["errors"].items():
        st.error(f"{method}: {error}", icon="⚠️")
    if not previews:
        return
    limit = threshold()
    st.table(summary_frame(previews, comparison["settings"], limit))
    for col, method in zip(st.columns(len(previews)), previews, strict=True):
        col.button(f"Apply {method}", key=f"apply_preview:{method}", on_click=queue, args=("apply_compared", SECTION),
                   kwargs={"method": method}, disabled=stale, type="primary")
    st.markdown(f"**Prompt by prompt**: the top answer with each method's edit; the largest change of any token's "
                f"probability; highlighted: the top answer changed or a probability moved by ≥ {limit:.2f} "
                "(the threshold of the probes)")
    frame, flags = prompt_frame(previews)
    st.table(frame.style.apply(lambda _: flags.map(lambda f: HIGHLIGHT if f >= limit else ""), axis=None))


def summary_frame(previews: dict[str, EditPreview], settings: dict[str, Any], threshold: float) -> pd.DataFrame:
    """Quantities (rows) by method (columns)."""
    columns = {}
    for method, preview in previews.items():
        edit = preview.edit_row
        paraphrases = [r for r in preview.rows if r["kind"] == PARAPHRASE]
        others = [r for r in preview.rows if r["kind"] != EDIT and r["kind"] != PARAPHRASE]
        moved = [r for r in others if flagged(r, threshold)]
        column = {
            f"p(new target {token(edit['target'] or '')})": f"{edit['target_before']:.3f} → {edit['target_after']:.3f}",
            f"p(old answer {token(edit['old']['token'])})": f"{edit['old']['before']:.3f} → {edit['old']['after']:.3f}",
            "top answer with the edit": answer(edit["after"]),
        }
        if paraphrases:
            before = sum(r["target_before"] for r in paraphrases) / len(paraphrases)
            after = sum(r["target_after"] for r in paraphrases) / len(paraphrases)
            column["paraphrases: mean p(new target)"] = f"{before:.3f} → {after:.3f}"
        column[f"other prompts moved (≥ {threshold:.2f} or top changed)"] = (
            f"{len(moved)} of {len(others)}" + (": " + ", ".join(r["prompt"] for r in moved) if moved else ""))
        column["layers touched"] = ", ".join(map(str, preview.layers)) or "-"
        column["‖Δ‖_F (parameters)"] = f"{preview.norm:.4g} ({len(preview.params)})"
        column["compute time"] = f"{preview.timings['compute_ms'] / 1000:.2f} s"
        column["settings"] = changed_settings(settings.get(method, {}))
        columns[method] = column
    return pd.DataFrame(columns)


def prompt_frame(previews: dict[str, EditPreview]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, flags): per prompt of the comparison (rows), the answer now and per method the answer with its
    edit and the largest probability change; flags: |shift| (inf where the top answer changed) per cell."""
    first = next(iter(previews.values()))
    index = [f"{r['prompt']} ({r['kind']})" for r in first.rows]
    cells: dict[str, list[str]] = {"now": [answer(r["before"]) for r in first.rows]}
    flags: dict[str, list[float]] = {"now": [0.0] * len(first.rows)}
    for method, preview in previews.items():
        cells[method] = [f"{answer(r['after'])} · {shift_text(r)}" for r in preview.rows]
        flags[method] = [float("inf") if r["flipped"] else abs(r["shift"]) for r in preview.rows]
    return pd.DataFrame(cells, index=index), pd.DataFrame(flags, index=index)
