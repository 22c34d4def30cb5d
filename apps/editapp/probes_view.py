"""Probes: prompts re-scored after every change, with answers changed by the last change highlighted."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from factedit.session import EditSession

from .ui import flash, highlight_rows, lines, run_action, show_messages, token

SECTION = "probes"


def render_probes(service: EditSession) -> None:
    st.subheader("Probes")
    st.caption("Re-scored after every edit and revert; a highlighted row changed its answer in the last change.")
    show_messages(SECTION)
    try:
        scored = service.score_probes()
    except Exception as exc:
        st.error(f"Could not score the probes: {type(exc).__name__}: {exc}")
        scored = []
    if scored:
        st.table(highlight_rows(probe_frame(scored, service.probes_before_last_change()), "changed"))
    else:
        st.info("No probes yet: add some below.")
    with st.form("probes_form", border=False):
        st.text_area("Probe prompts, one per line", value="\n".join(service.probes), key="probes_text",
                     height=150)
        st.form_submit_button("Save probes", key="save_probes", on_click=_save, args=(service,))


def probe_frame(scored: list[dict], before: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for row in scored:
        now = row["top"][0]
        prior = before.get(row["prompt"])
        was = prior["top"][0] if prior else None
        changed = was is not None and was["id"] != now["id"]
        rows.append({
            "probe": row["prompt"],
            "answer now": f"{token(now['token'])} {now['prob']:.3f}",
            "before last change": f"{token(was['token'])} {was['prob']:.3f}" if was else "",
            "changed": "changed" if changed else "",
        })
    return pd.DataFrame(rows, columns=["probe", "answer now", "before last change", "changed"])


def _save(service: EditSession) -> None:
    probes = lines(st.session_state.get("probes_text"))
    if run_action(SECTION, "Saving the probes", lambda: service.set_probes(probes) or True):
        flash(SECTION, "success", f"{len(service.probes)} probes saved.")
