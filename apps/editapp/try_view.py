"""Try the model: any prompt, a chosen length, generated greedily without and with the selected edit,
side by side (generated text shown as written, newlines included). Refreshed when the weights change."""

from __future__ import annotations

import streamlit as st

from factedit.session import EditSession

from .ui import answer, md, show_text

MAX_TOKENS = 64


@st.fragment
def render_try(service: EditSession, edit_id: str | None) -> None:
    """A fragment: "Generate" reruns only this box; a change of the weights reruns the page, and it with it."""
    st.subheader("Try the model")
    with st.form("try_form", border=False):
        prompt_col, length_col = st.columns([3, 1], vertical_alignment="bottom")
        prompt_col.text_area("Any prompt", value=service.config.example_prompt, key="try_prompt", height=80)
        length_col.slider("Tokens to generate", 1, MAX_TOKENS, 24, key="try_tokens")
        st.form_submit_button("Generate", key="try_generate", on_click=st.session_state.update,
                              kwargs={"try_on": True})
    prompt = st.session_state.get("try_prompt") or ""
    if not st.session_state.get("try_on") or not prompt.strip():
        st.caption("Generate to see the prompt continued without and with the selected edit.")
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
