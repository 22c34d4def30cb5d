"""The header: which model and journal, and the model's health: active edits, drift against the base model
(the drift guard's measurement after the last active edit), the last change, and the guard's refusal."""

from __future__ import annotations

import time

import streamlit as st

from factedit.session import EditSession

from .ui import run_action, show_messages

WARN_SHARE = 0.8  # of the guard's bound: drift past it is shown as a warning


def render_header(service: EditSession, where) -> None:
    """The header, drawn into `where` (a container at the top of the page)."""
    with where:
        _header(service)


def _header(service: EditSession) -> None:
    st.title("factedit: edit facts in a language model")
    st.caption(f"model `{service.config.model}` · journal `{service.journal_path}` · every tab of this server "
               "shares the model and history")
    if service.journal_error:
        st.error(f"The journal cannot be used: {service.journal_error}", icon="⚠️")
        st.button("Start a new journal (the old file is kept)", key="new_journal",
                  on_click=lambda: run_action("journal", "Starting a new journal", service.start_new_journal))
    show_messages("journal")
    render_health(service)


def render_health(service: EditSession) -> None:
    health = service.health()
    bound = health["guard_max_ratio"]
    drift = health.get("drift")
    active, total = health.get("active_edits", 0), health.get("edits", 0)
    if not active:
        drift_text = "drift 1.000× (no active edit: the base weights)"
    elif drift is None:
        drift_text = "drift not measured (the guard was off for these edits)"
    else:
        drift_text = (f"drift **{drift:.3f}×** the base model's perplexity of the reference text "
                      f"(measured by the guard after edit `{health.get('drift_edit')}`)")
    line = (f"**Model health** · **{active}** active edit(s) of {total} in the journal · {drift_text} · "
            f"the guard refuses an edit past **{bound:g}×**")
    if drift is not None and active and drift > 1 + WARN_SHARE * (bound - 1):
        st.warning(line + ": close to the bound; revert some edits or expect refusals.", icon="⚠️")
    else:
        st.markdown(line)
    refusal = health.get("last_refusal")
    if refusal:
        when = time.strftime("%H:%M:%S", time.localtime(refusal["at"]))
        st.error(f"The drift guard refused {refusal['what']} at {when}: it would have raised the reference "
                 f"perplexity to {refusal['ratio']:.3g}× the base model's (bound {refusal['max_ratio']:g}×). It was "
                 "undone and not journaled; the model is unchanged. Try another method (compare them), or revert "
                 "some edits.", icon="🛡️")
