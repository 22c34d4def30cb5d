"""Probes: prompts re-scored after every change; a probe is flagged when the last change flipped its top
answer or moved any next token's probability by at least the threshold the user sets."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from factedit.session import EditSession

from .preview_view import DEFAULT_THRESHOLD
from .ui import answer, flagged, flash, highlight_rows, lines, run_action, shift_text, show_messages

SECTION = "probes"


def render_probes(service: EditSession) -> None:
    st.subheader("Probes")
    st.caption(f"Re-scored after every change. {last_change_text(service)}")
    threshold = st.slider("Flag a probe when a token's probability moves by at least", 0.01, 0.5,
                          value=DEFAULT_THRESHOLD, step=0.01, key="probe_threshold",
                          help="…or when its top answer changes. Used by the comparison too.")
    show_messages(SECTION)
    try:
        rows = service.probe_changes()
    except Exception as exc:
        st.error(f"Could not score the probes: {type(exc).__name__}: {exc}")
        rows = []
    if rows:
        st.table(highlight_rows(probe_frame(rows, threshold), "flag"))
    else:
        st.info("No probes yet: add some below.")
    with st.form("probes_form", border=False):
        st.text_area("Probe prompts, one per line", value="\n".join(service.probes), key="probes_text",
                     height=150)
        st.form_submit_button("Save probes", key="save_probes", on_click=_save, args=(service,))


def last_change_text(service: EditSession) -> str:
    change = service.last_change
    if change is None:
        return "No change yet in this server's run."
    ids = ", ".join(change["edit_ids"])
    what = {"edit": f"edit {ids} applied", "import": f"edit {ids} imported",
            "revert": f"edit(s) {ids} reverted"}.get(change["kind"], change["kind"])
    return f"Last change: {what}; “before” is the model just before it."


def probe_frame(rows: list[dict], threshold: float) -> pd.DataFrame:
    out = []
    for row in rows:
        known = row["before"] is not None
        flag = ""
        if known and row["flipped"]:
            flag = "top changed"
        elif known and flagged(row, threshold):
            flag = "moved"
        out.append({
            "probe": row["prompt"],
            "answer now": answer(row["after"]),
            "before last change": answer(row["before"]) if known else "",
            "largest change": shift_text(row) if known and row["shift"] else "",
            "flag": flag,
        })
    return pd.DataFrame(out, columns=["probe", "answer now", "before last change", "largest change", "flag"])


def _save(service: EditSession) -> None:
    probes = lines(st.session_state.get("probes_text"))
    if run_action(SECTION, "Saving the probes", lambda: service.set_probes(probes) or True):
        flash(SECTION, "success", f"{len(service.probes)} probes saved.")
