"""The edit section: the method (with the guide to the methods and its settings), the fact, and two
buttons: "Preview edit" (computed and scored, shown, applied only on "Apply this edit") and "Apply without
preview" (one click, for speed). Right under the buttons: the status line where the action reports its
progress and outcome, its messages, the preview; then the prompt's current prediction and the last edit.

Everything below the status line is drawn after the action, on the new weights; the header above it is
drawn at the end of such a run (apps/app.py), so no second run is needed to show the result."""

from __future__ import annotations

import streamlit as st

from factedit.session import EditSession

from .actions import EDIT as SECTION
from .actions import queue, run_pending
from .last_edit_view import render_last_edit
from .methods import description, method_guide, settings_inputs
from .preview_view import render_preview
from .ui import md, show_messages, token

STATUS_HEIGHT = 64  # px: room for a progress bar and its label


def render_edit(service: EditSession) -> None:
    st.subheader("Edit a fact")
    methods = service.methods
    default = service.default_method
    method = st.selectbox("Method", methods, index=methods.index(default) if default in methods else 0,
                          key="edit_method")
    st.caption(description(method))
    with st.expander("Which method? A short guide"):
        st.markdown(method_guide())
    with st.expander(f"Settings of {method}"):
        settings_inputs(service, method)
    _form(service)
    status = st.container(height=STATUS_HEIGHT, border=False).empty()
    if "pending" not in st.session_state:
        status.caption("Ready. “Preview edit” shows what the edit would do before anything is applied.")
    run_pending(service, SECTION, status)
    show_messages(SECTION)
    render_preview(service)
    prompt = (st.session_state.get("edit_prompt") or "").strip()
    if prompt:
        _now(service, prompt)
    render_last_edit(service)


def _form(service: EditSession) -> None:
    with st.form("edit_form", border=True):
        left, right = st.columns(2)
        left.text_input("Prompt", value=service.config.example_prompt, key="edit_prompt")
        right.text_input("New target", value=service.config.example_target, key="edit_target",
                         help="The continuation the prompt should get; joined to the prompt with one space.")
        with st.expander("Paraphrases and locality prompts (optional)"):
            st.text_area("Paraphrases, one per line (generalisation is measured on them)", key="edit_paraphrases")
            st.text_area("Locality prompts, one per line (their answers should not change)", key="edit_locality")
        preview, apply, _ = st.columns([1, 1, 2])
        preview.form_submit_button("Preview edit", type="primary", key="preview_edit", on_click=queue,
                                   args=("preview", SECTION),
                                   help="Compute the edit and show what it would do (the prompt, paraphrases, "
                                        "probes and a few automatic neighbours); nothing is applied until you "
                                        "confirm.")
        apply.form_submit_button("Apply without preview", key="apply_edit", on_click=queue, args=("edit", SECTION),
                                 help="Compute and apply in one click; what it did is shown afterwards.")


def _now(service: EditSession, prompt: str) -> None:
    try:
        top = service.next_tokens(prompt)  # one forward pass; continuations: "Try the model" below
    except Exception as exc:
        st.error(f"Could not score the prompt: {type(exc).__name__}: {exc}")
        return
    first = top[0]
    st.markdown(f"Now: {md(prompt)} → top prediction **{md(token(first['token']))}** (p = {first['prob']:.3f})")
    st.caption("Next: " + " · ".join(f"{md(token(t['token']))} {t['prob']:.3f}" for t in top[1:]))
