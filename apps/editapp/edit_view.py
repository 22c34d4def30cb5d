"""The edit form, the before/after comparison of the last edit, and the prompt's current prediction."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from factedit.session import EditOutcome, EditSession, Prediction

from .charts import AFTER, BEFORE, probability_chart
from .ui import flash, highlight_rows, lines, md, run_action, show_messages, token, top_table

SECTION = "edit"


def render_edit(service: EditSession) -> None:
    st.subheader("Edit a fact")
    _form(service)
    show_messages(SECTION)
    outcome: EditOutcome | None = st.session_state.get("last_outcome")
    if outcome is not None:
        _outcome(service, outcome)
    prompt = (st.session_state.get("edit_prompt") or "").strip()
    if prompt:
        _now(service, prompt)


def _form(service: EditSession) -> None:
    methods = service.methods
    default = service.config.default_method
    with st.form("edit_form", border=True):
        st.selectbox("Method", methods, index=methods.index(default) if default in methods else 0,
                     key="edit_method")
        left, right = st.columns(2)
        left.text_input("Prompt", value=service.config.example_prompt, key="edit_prompt")
        right.text_input("New target", value=service.config.example_target, key="edit_target",
                         help="The continuation the prompt should get; joined to the prompt with one space.")
        with st.expander("Paraphrases and locality prompts (optional)"):
            st.text_area("Paraphrases, one per line (generalisation is measured on them)", key="edit_paraphrases")
            st.text_area("Locality prompts, one per line (their answers should not change)", key="edit_locality")
        st.form_submit_button("Apply edit", type="primary", key="apply_edit", on_click=_apply, args=(service,))


def _apply(service: EditSession) -> None:
    state = st.session_state
    method, prompt, target = state.get("edit_method"), state.get("edit_prompt") or "", state.get("edit_target") or ""

    def work() -> EditOutcome:
        return service.edit(method, prompt, target, lines(state.get("edit_paraphrases")),
                            lines(state.get("edit_locality")))

    with st.spinner(f"Applying the edit with {method}…"):
        outcome = run_action(SECTION, "The edit", work)
    if outcome is not None:
        state["last_outcome"] = outcome
        state["selected_edit"] = outcome.record.id  # the history's selection follows the newest edit
        ms = outcome.record.timings.get("edit_ms", float("nan"))
        flash(SECTION, "success", f"Edit {outcome.record.id} applied with {method} in {ms / 1000:.1f} s.")


def _outcome(service: EditSession, outcome: EditOutcome) -> None:
    record = outcome.record
    current = {r.id: r for r in service.history()}.get(record.id)
    status = current.status if current is not None else "unknown"
    request = record.request
    st.markdown(f"**Last edit** `{record.id}` ({record.method}, {status}): "
                f"{md(request.prompt)} → {md(token(request.target))}")
    if status != "active":
        st.caption("This edit is no longer active; the current prediction is shown below.")
    pre = (record.pre.get("requests") or [{}])[0]
    post = (record.post.get("requests") or [{}])[0]
    before_col, after_col = st.columns(2)
    for col, title, scores, prediction in (
        (before_col, "Before", pre, outcome.before),
        (after_col, "After", post, outcome.after),
    ):
        with col:
            _prediction_block(title, scores.get("top") or prediction.top, prediction.continuation)
    if pre and post:
        st.altair_chart(probability_chart(_probability_frame(request.target, pre, post)), width="stretch")
        _extras(request, pre, post)


def _extras(request, pre: dict, post: dict) -> None:
    """Paraphrases (p(target) before/after) and locality prompts (top-1 before/after), when given."""
    if request.paraphrases:
        st.markdown("**Paraphrases**: p(new target) before → after")
        st.table(pd.DataFrame([
            {"paraphrase": text, "before": f"{b['target_prob']:.3f}", "after": f"{a['target_prob']:.3f}",
             "target is argmax after": "yes" if a["target_is_argmax"] else "no"}
            for text, b, a in zip(
                request.paraphrases, pre.get("paraphrases", []), post.get("paraphrases", []), strict=False
            )
        ]))
    if request.locality:
        rows = []
        for b, a in zip(pre.get("locality", []), post.get("locality", []), strict=False):
            before, after = b["top"][0], a["top"][0]
            rows.append({"locality prompt": b["prompt"], "before": f"{token(before['token'])} {before['prob']:.3f}",
                         "after": f"{token(after['token'])} {after['prob']:.3f}",
                         "changed": "changed" if before["id"] != after["id"] else ""})
        st.markdown("**Locality prompts**: top prediction before → after")
        st.table(highlight_rows(pd.DataFrame(rows), "changed"))


def _prediction_block(title: str, top: list[dict], continuation: str) -> None:
    first = top[0] if top else {"token": "", "prob": 0.0}
    st.markdown(f"**{title}:** top prediction {md(token(first['token']))} (p = {first['prob']:.3f})")
    st.table(top_table(top))
    st.caption(f"Greedy continuation: …{md(repr(continuation))}")


def _probability_frame(target: str, pre: dict, post: dict) -> pd.DataFrame:
    old = pre["old_answer"]
    new_label, old_label = f"p(new target {token(target)})", f"p(old answer {token(old['token'])})"
    rows = [
        (new_label, BEFORE, pre["target_prob"]),
        (new_label, AFTER, post["target_prob"]),
        (old_label, BEFORE, old["prob"]),
        (old_label, AFTER, post["old_answer"]["prob"]),
    ]
    return pd.DataFrame(rows, columns=["quantity", "when", "probability"])


def _now(service: EditSession, prompt: str) -> None:
    st.markdown("**The model now**")
    try:
        prediction: Prediction = service.predict(prompt)
    except Exception as exc:
        st.error(f"Could not score the prompt: {type(exc).__name__}: {exc}")
        return
    first = prediction.top[0]
    st.markdown(f"Now: {md(prompt)} → top prediction {md(token(first['token']))} (p = {first['prob']:.3f}); "
                f"greedy: …{md(repr(prediction.continuation))}")
