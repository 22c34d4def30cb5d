"""Try the model, two views: a chat (the question through the model's chat template, the reply streamed,
chat_view.py) and the plain continuation (any prompt, a chosen length, generated greedily without and
with the selected edit, side by side). Both refresh when the weights change."""

from __future__ import annotations

import streamlit as st

from factedit.session import EditSession

from .chat_view import render_chat
from .ui import answer, md, show_text

MAX_TOKENS = 64
CHAT, PLAIN = "Chat", "Plain continuation"


@st.fragment
def render_try(service: EditSession, edit_id: str | None) -> None:
    """A fragment: its buttons rerun only this box; a change of the weights reruns the page, and it with it."""
    st.subheader("Try the model")
    mode = st.radio("View", [CHAT, PLAIN], horizontal=True, key="try_mode", label_visibility="collapsed")
    if mode == CHAT:
        render_chat(service, edit_id)
    else:
        _plain(service, edit_id)


def _plain(service: EditSession, edit_id: str | None) -> None:
    with st.form("try_form", border=False):
        prompt_col, length_col = st.columns([3, 1], vertical_alignment="bottom")
        prompt_col.text_area("Any prompt", value=service.config.example_prompt, key="try_prompt", height=80)
        length_col.slider("Tokens to generate", 1, MAX_TOKENS, 24, key="try_tokens")
        st.form_submit_button("Generate", key="try_generate", on_click=st.session_state.update,
                              kwargs={"try_on": True})
    prompt = st.session_state.get("try_prompt") or ""
    if not st.session_state.get("try_on"):
        st.caption("Generate to see the prompt continued without and with the selected edit.")
        return
    if not prompt.strip():
        st.warning("The prompt is empty: type a prompt to continue, then Generate.", icon="⚠️")
        return
    tokens = int(st.session_state.get("try_tokens") or 24)
    try:
        with st.spinner("Generating…"):
            if edit_id is None:
                columns = [("The model now (no edits yet)", service.predict(prompt, tokens))]
            else:
                result = service.try_prompt(prompt, edit_id, tokens)
                now_without = "the model now: the edit is reverted" if not result["active"] else "its weights removed"
                now_with = "the model now" if result["active"] else "re-applied on the current weights"
                columns = [(f"Without edit {edit_id} ({now_without})", result["without"]),
                           (f"With edit {edit_id} ({now_with})", result["with"])]
    except Exception as exc:
        st.error(f"Could not generate: {type(exc).__name__}: {exc}")
        return
    for col, (title, prediction) in zip(st.columns(len(columns)), columns, strict=True):
        with col:
            st.markdown(f"**{md(title)}** · next token {md(answer(prediction.top))}")
            show_text(prompt + prediction.continuation)
