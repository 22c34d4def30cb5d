"""The chat view of "Try the model": the question through the model's chat template (the tokenizer's
`apply_chat_template`, factedit.model.chat), the reply of the model now streamed from the session's
generation engine (the `BatchGenerator` the service's chat completions use), and beside it the reply with
the selected edit toggled (without an active edit, a reverted one re-applied), generated greedily through
the session's read view. Only "Ask" generates: replies are kept with the question, length, edit and
weights version they were made for; a rerun of the page shows them again, and once any of those changed
they are marked as older than the change until the next "Ask" (generating two replies after every edit
and revert would hold up the page, and the engine, each time)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import streamlit as st

from factedit.model.chat import chat_ids, chat_text, has_chat_template
from factedit.session import EditSession
from factedit.session.generation_types import SamplingParams, TextDelta

from .ui import md

DEFAULT_QUESTION = "What is the capital of France?"
MAX_TOKENS = 64  # the session generates at most this many tokens for the toggled side


def render_chat(service: EditSession, edit_id: str | None) -> None:
    if not has_chat_template(service.tokenizer):
        st.info("This model's tokenizer has no chat template: use the plain continuation.")
        return
    with st.form("chat_form", border=False):
        question_col, length_col = st.columns([3, 1], vertical_alignment="bottom")
        question_col.text_input("Your question", value=DEFAULT_QUESTION, key="chat_question")
        length_col.slider("Reply length (tokens, at most)", 4, MAX_TOKENS, 32, key="chat_tokens")
        st.form_submit_button("Ask", key="chat_ask", on_click=st.session_state.update, kwargs={"chat_asked": True})
    question = (st.session_state.get("chat_question") or "").strip()
    tokens = int(st.session_state.get("chat_tokens") or 32)
    key = (question, tokens, edit_id, service.version)
    kept = st.session_state.get("chat_replies")
    if not st.session_state.pop("chat_asked", False):  # only "Ask" generates; a rerun shows what was made
        if kept is None:
            st.caption("Ask to see the model's reply as a chat, without and with the selected edit, side by side.")
        elif kept["key"] == key:
            _replies(service, edit_id, kept["replies"])
        else:
            _show_stale(kept)
        return
    if not question:
        st.warning("The question is empty: type a question, then Ask.", icon="⚠️")
        return
    st.session_state.pop("chat_replies", None)
    try:
        replies = _replies(service, edit_id, None, question, tokens)
    except Exception as exc:  # the page must not crash on a generation error
        st.error(f"Could not generate the reply: {type(exc).__name__}: {exc}")
        return
    st.session_state["chat_replies"] = {"key": key, "replies": replies}


def _replies(service: EditSession, edit_id: str | None, kept: dict[str, Any] | None, question: str = "",
             tokens: int = 0) -> dict[str, Any]:
    """Draw the replies: `kept` ones, or (None) new ones for `question`, the model now's streamed first.
    Returns {"now", "other", "titles"} to keep."""
    messages = [{"role": "user", "content": question}]
    kept = kept or {}
    if edit_id is None:
        (column,) = st.columns(1)
        with column:
            st.markdown("**The model now** (no edits yet)")
            now = _show(kept.get("now"), lambda: _stream(service, messages, tokens))
        return {"now": now, "titles": [("**The model**", now)]}
    active = next((r.status == "active" for r in service.history() if r.id == edit_id), False)
    without_col, with_col = st.columns(2)
    now_col, other_col = (with_col, without_col) if active else (without_col, with_col)
    without_col.markdown(f"**Without edit {edit_id}** ({'its weights removed' if active else 'the model now'})")
    with_col.markdown(f"**With edit {edit_id}** ({'the model now' if active else 're-applied on the current weights'})")
    with now_col:  # the model now first, streamed: the first words show at once
        now = _show(kept.get("now"), lambda: _stream(service, messages, tokens))
    with other_col:
        other = _show(kept.get("other"), lambda: _toggled(service, messages, edit_id, tokens))
    st.caption("Greedy replies; the question goes through the model's own chat template, as "
               "/v1/chat/completions of `factedit serve` sends it.")
    return {"now": now, "other": other, "titles": [(f"**{'With' if active else 'Without'} edit {edit_id}**", now),
                                                   (f"**{'Without' if active else 'With'} edit {edit_id}**", other)]}


def _show_stale(kept: dict[str, Any]) -> None:
    """Replies made for other weights, another edit or another question, shown as such (not generated again)."""
    st.info("These replies were made before the last change (an edit, a revert, an import, another selected "
            "edit or question): Ask again to see the model now.")
    for title, text in kept["replies"].get("titles", []):
        st.markdown(f"{title} (before the change)")
        _write(text)


def _show(kept: str | None, make: Callable[[], str]) -> str:
    """Show a kept reply, or make it (a stream is written as it comes); say so when the reply is empty."""
    if kept is None:
        text = make()
    else:
        text = kept
        _write(text)
    if not text.strip():
        st.caption("(an empty reply: the model ended its turn at once)")
    return text


def _write(text: str) -> None:
    if text.strip():
        st.markdown(md(text))  # as typed: nothing in a reply is read as markdown


def _stream(service: EditSession, messages: list[dict[str, str]], tokens: int) -> str:
    """The reply of the model now, streamed from the session's generation engine; returns its text."""
    handle = service.generator.submit(chat_ids(service.tokenizer, messages),
                                      SamplingParams(max_tokens=tokens, temperature=0.0))
    parts: list[str] = []
    try:
        st.write_stream(_deltas(handle, parts))
    finally:
        handle.cancel()  # a no-op once finished; frees the engine's slot if the page run stopped early
    return "".join(parts)


def _deltas(handle, parts: list[str]) -> Iterator[str]:
    """The reply's new text as it comes, escaped for markdown; the raw text is appended to `parts`."""
    for event in handle:
        if isinstance(event, TextDelta) and event.text:
            parts.append(event.text)
            yield md(event.text)


def _toggled(service: EditSession, messages: list[dict[str, str]], edit_id: str, tokens: int) -> str:
    with st.spinner("Generating with the edit toggled…"):
        _, prediction = service.toggled_prediction(chat_text(service.tokenizer, messages), edit_id, tokens)
    _write(prediction.continuation)
    return prediction.continuation
