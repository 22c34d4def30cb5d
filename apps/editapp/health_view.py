"""The header: which model and journal (by name), and the model's health: active edits, and the drift
against the base model measured again after every change (an edit, a revert, an import; the session's
drift meter), saying what it measured and after which change; the guard's bound and its last refusal."""

from __future__ import annotations

import time
from pathlib import Path

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
    st.caption(f"model `{Path(service.config.model).name}` · journal `{service.journal_path.name}` · every tab of "
               "this server "
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
    active, total = health.get("active_edits", 0), health.get("edits", 0)
    try:
        drift: float | None = service.measure_drift()  # cached per weights version: measured once per change
    except Exception as exc:  # the header must not take the page down
        drift = None
        st.caption(f"Drift could not be measured: {type(exc).__name__}: {exc}")
    drift_text = "drift not measured" if drift is None else (
        f"drift **{drift:.3f}×**: the {service.drift_meter.describe()}, measured {_after(health.get('last_change'))}")
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


def _after(change: dict | None) -> str:
    """When the drift was measured, in words: after which change."""
    if not change:
        return "on the weights as loaded (no change since the app started)"
    ids = ", ".join(f"`{i}`" for i in change.get("edit_ids") or []) or "?"
    what = {"edit": "the edit", "revert": "the revert of", "import": "the import of"}.get(change.get("kind"), "change")
    return f"after {what} {ids} at {time.strftime('%H:%M:%S', time.localtime(change.get('at', time.time())))}"
