"""Compare methods: one fact, each chosen method's edit computed on the same (current) weights and scored
without being applied (EditSession.preview), side by side; then apply one of them exactly as computed."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from factedit.editing.preview import EDIT, PARAPHRASE, EditPreview
from factedit.session import EditSession

from .edit_view import DEFAULT_THRESHOLD, queue
from .methods import changed_settings
from .ui import HIGHLIGHT, answer, flagged, shift_text, token


def render_compare(service: EditSession) -> None:
    comparison = st.session_state.get("comparison")
    if not comparison:
        return
    title, close = st.columns([5, 1], vertical_alignment="bottom")
    title.subheader(f"Compare methods: {comparison['prompt']} → {comparison['target']}")
    close.button("Close comparison", key="close_comparison", on_click=st.session_state.pop, args=("comparison", None))
    previews: dict[str, EditPreview] = comparison["previews"]
    stale = comparison["version"] != service.version
    if stale:
        st.info("The weights changed since this comparison (an edit or a revert): its edits were fitted to the "
                "weights as they were and can no longer be applied. Compare again.")
    else:
        st.caption("Each method's edit was computed on the current weights and scored with the edit added, "
                   "nothing applied. “Apply” applies exactly that edit (not computed again).")
    for method, error in comparison["errors"].items():
        st.error(f"{method}: {error}", icon="⚠️")
    if not previews:
        return
    threshold = st.session_state.get("probe_threshold", DEFAULT_THRESHOLD)
    st.table(summary_frame(previews, comparison["settings"], threshold))
    for col, method in zip(st.columns(len(previews)), previews, strict=True):
        col.button(f"Apply {method}", key=f"apply_preview:{method}", on_click=queue, args=("apply",),
                   kwargs={"method": method}, disabled=stale, type="primary")
    st.markdown(f"**Prompt by prompt**: the top answer with each method's edit; the largest change of any token's "
                f"probability; highlighted: the top answer changed or a probability moved by ≥ {threshold:.2f} "
                "(the threshold of the probes)")
    frame, flags = prompt_frame(previews)
    st.table(frame.style.apply(lambda _: flags.map(lambda f: HIGHLIGHT if f >= threshold else ""), axis=None))


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
