"""The edit form (method, its settings, the fact), the status line where slow work reports progress, the
prompt's current prediction, and the last edit of the journal with its before/after.

Slow actions (an edit, a comparison, applying a compared edit) are queued by their button's callback
and run in the script, at the status line: a fixed-height slot, so progress never pushes the page
down. Everything below it is drawn after the action, on the new weights; the header above it is drawn
at the end of such a run (apps/app.py), so no second run is needed to show the result.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd
import streamlit as st

from factedit import FacteditError, InvalidRequestError
from factedit.session import EditOutcome, EditSession

from .charts import AFTER, BEFORE, probability_chart
from .methods import FINE_TUNING, changed_settings, description, settings_inputs, stored_overrides
from .ui import (
    flagged,
    flash,
    highlight_rows,
    lines,
    md,
    note_timing,
    run_action,
    shift_text,
    show_messages,
    show_text,
    token,
    top_table,
)

logger = logging.getLogger(__name__)

SECTION = "edit"
STATUS_HEIGHT = 64  # px: room for a progress bar and its label
DEFAULT_THRESHOLD = 0.1


def render_edit(service: EditSession) -> None:
    st.subheader("Edit a fact")
    methods = service.methods
    default = service.config.default_method
    method = st.selectbox("Method", methods, index=methods.index(default) if default in methods else 0,
                          key="edit_method")
    st.caption(description(method))
    with st.expander(f"Settings of {method}"):
        settings_inputs(service, method)
    _form(service)
    status = st.container(height=STATUS_HEIGHT, border=False).empty()
    run_pending(service, status)
    show_messages(SECTION)
    prompt = (st.session_state.get("edit_prompt") or "").strip()
    if prompt:
        _now(service, prompt)
    records = service.history()
    if records:
        _last_edit(service, records[-1])


def _form(service: EditSession) -> None:
    with st.form("edit_form", border=True):
        left, right = st.columns(2)
        left.text_input("Prompt", value=service.config.example_prompt, key="edit_prompt")
        right.text_input("New target", value=service.config.example_target, key="edit_target",
                         help="The continuation the prompt should get; joined to the prompt with one space.")
        with st.expander("Paraphrases and locality prompts (optional)"):
            st.text_area("Paraphrases, one per line (generalisation is measured on them)", key="edit_paraphrases")
            st.text_area("Locality prompts, one per line (their answers should not change)", key="edit_locality")
        st.multiselect("Methods to compare", service.methods, default=service.methods, key="compare_methods")
        apply, compare = st.columns(2)
        apply.form_submit_button("Apply edit", type="primary", key="apply_edit", on_click=queue, args=("edit",))
        compare.form_submit_button("Compare methods", key="compare", on_click=queue, args=("compare",),
                                   help="Compute the edit with each chosen method on the current weights, "
                                        "without applying any; then apply the one you prefer.")


def queue(action: str, **details: Any) -> None:
    """A button's callback: run `action` in this run's script, at the status line."""
    st.session_state["pending"] = {"action": action, **details}


def _fact() -> dict[str, Any]:
    state = st.session_state
    return {"prompt": state.get("edit_prompt") or "", "target": state.get("edit_target") or "",
            "paraphrases": lines(state.get("edit_paraphrases")), "locality": lines(state.get("edit_locality"))}


def run_pending(service: EditSession, status) -> None:
    """Run the queued action, reporting in `status` (an st.empty in the fixed-height slot)."""
    pending = st.session_state.pop("pending", None)
    if pending is None:
        status.caption("Ready. The fine-tuning methods report their steps here while they edit.")
        return
    action = pending["action"]
    note_timing(action=action, action_start=time.time())
    if action == "edit":
        _do_edit(service, status)
    elif action == "compare":
        _do_compare(service, status)
    elif action == "apply":
        _do_apply(service, status, pending["method"])
    status.caption("Done.")
    note_timing(action_end=time.time())


def reporter(bar, label: str, start: float = 0.0, share: float = 1.0):
    """progress(step, max_steps, loss) drawing on `bar` (a st.progress), within [start, start + share]."""
    def report(step: int, total: int, loss: float) -> None:
        value = min(start + share * step / max(total, 1), 1.0)
        bar.progress(value, text=f"{label}: step {step}/{total}, loss {loss:.3f}")
    return report


def _do_edit(service: EditSession, status) -> None:
    method, fact = st.session_state.get("edit_method"), _fact()
    overrides = run_action(SECTION, f"The settings of {method}", lambda: stored_overrides(service, method))
    if overrides is None:
        return
    bar = status.progress(0.0, text=f"Editing with {method} ({changed_settings(overrides)})…")
    progress = reporter(bar, f"Editing with {method}") if method in FINE_TUNING else None
    start = time.perf_counter()
    outcome = run_action(SECTION, "The edit", lambda: service.edit(
        method, fact["prompt"], fact["target"], fact["paraphrases"], fact["locality"],
        overrides=overrides, progress=progress, predict=False))
    note_timing(method=method, session_s=time.perf_counter() - start,
                editor=dict(outcome.record.timings) if outcome is not None else None)
    if outcome is not None:
        select(outcome.record.id)
        ms = outcome.record.timings.get("edit_ms", float("nan"))
        flash(SECTION, "success", f"Edit {outcome.record.id} applied with {method} in {ms / 1000:.1f} s.")


def _do_compare(service: EditSession, status) -> None:
    methods, fact = list(st.session_state.get("compare_methods") or []), _fact()
    if not methods:
        flash(SECTION, "error", "Choose at least one method to compare.")
        return
    bar = status.progress(0.0, text="Comparing…")
    previews, errors, settings = {}, {}, {}
    for index, method in enumerate(methods):
        label = f"Comparing {index + 1}/{len(methods)}: {method}"
        bar.progress(index / len(methods), text=f"{label}…")
        try:
            settings[method] = stored_overrides(service, method)
            previews[method] = service.preview(
                method, fact["prompt"], fact["target"], fact["paraphrases"], fact["locality"],
                overrides=settings[method], progress=reporter(bar, label, index / len(methods), 1 / len(methods)))
        except InvalidRequestError as exc:  # bad input: every method refuses it alike
            flash(SECTION, "error", f"The comparison failed: {exc}")
            return
        except FacteditError as exc:
            errors[method] = str(exc)
        except Exception as exc:  # one method failing must not lose the others
            logger.exception("preview with %s failed", method)
            errors[method] = f"{type(exc).__name__}: {exc}"
    st.session_state["comparison"] = {"version": service.version, **fact, "previews": previews,
                                      "errors": errors, "settings": settings}
    if not previews:
        flash(SECTION, "error", "The comparison failed: " + "; ".join(f"{m}: {e}" for m, e in errors.items()))


def _do_apply(service: EditSession, status, method: str) -> None:
    comparison = st.session_state.get("comparison") or {}
    preview = comparison.get("previews", {}).get(method)
    if preview is None:
        flash(SECTION, "error", f"No compared {method} edit to apply; compare again.")
        return
    status.progress(0.5, text=f"Applying the compared {method} edit (the drift guard measures the model)…")
    outcome = run_action(SECTION, f"Applying the {method} edit", lambda: service.apply_preview(preview, predict=False))
    if outcome is not None:
        select(outcome.record.id)
        flash(SECTION, "success", f"Edit {outcome.record.id} applied: the {method} edit as compared "
                                  f"(computed in {preview.timings['compute_ms'] / 1000:.1f} s, not again).")


def select(edit_id: str) -> None:
    """Make `edit_id` the selected edit (the history, the diff and the try box follow it).

    The selection lives in the session state, not in the selectbox's own state: a rerun request that the
    browser sent before the page showed the new selection (the sync timer's, say) carries the old value
    of the selectbox and would put it back. The selectbox gets a new key instead (history_view.py)."""
    state = st.session_state
    state["selection"] = edit_id
    state["selection_nonce"] = state.get("selection_nonce", 0) + 1


def _now(service: EditSession, prompt: str) -> None:
    st.markdown("**The model now**")
    try:
        top = service.next_tokens(prompt)  # one forward pass; continuations: "Try the model" below
    except Exception as exc:
        st.error(f"Could not score the prompt: {type(exc).__name__}: {exc}")
        return
    first = top[0]
    st.markdown(f"Now: {md(prompt)} → top prediction {md(token(first['token']))} (p = {first['prob']:.3f})")
    st.caption("Next: " + " · ".join(f"{md(token(t['token']))} {t['prob']:.3f}" for t in top[1:]))


def _last_edit(service: EditSession, record) -> None:
    """The newest edit of the journal (made in any tab, or imported), named by its id, with its status."""
    origin = service.origin(record.id) or {}
    outcome: EditOutcome | None = service.outcome(record.id)
    request = record.request
    imported = f", imported from edit `{origin.get('source_id')}`" if origin.get("kind") == "import" else ""
    st.markdown(f"**Last edit** `{record.id}` ({record.method}, {record.status}{imported}): "
                f"{md(request.prompt)} → {md(token(request.target))}")
    if record.status != "active":
        st.caption("This edit is no longer active: the model now is shown above; the diff of the edit shows what "
                   "it did.")
    else:
        st.caption("Generated text without and with it: “Try the model” below (the edit is selected there).")
    pre = (record.pre.get("requests") or [{}])[0]
    post = (record.post.get("requests") or [{}])[0]
    before_col, after_col = st.columns(2)
    for col, title, scores, prediction in (
        (before_col, "Before", pre, outcome.before if outcome else None),
        (after_col, "After", post, outcome.after if outcome else None),  # None: not generated right after
    ):
        with col:
            _prediction_block(title, scores.get("top") or (prediction.top if prediction else []),
                              prediction.prompt + prediction.continuation if prediction else None)
    if pre and post:
        _warnings(service, record, pre, post)
        st.altair_chart(probability_chart(_probability_frame(request.target, pre, post)), width="stretch")
        _extras(request, pre, post)
    st.caption(timing_text(record, origin))


def _warnings(service: EditSession, record, pre: dict, post: dict) -> None:
    """Say when the edit did not take or took narrowly, and which probes it moved."""
    old = post.get("old_answer", {})
    if not post.get("target_is_argmax"):
        top = post["top"][0]
        st.warning(f"The edit did not take: the top answer is {token(top['token'])} ({top['prob']:.3f}); "
                   f"p(new target) is {post['target_prob']:.3f}. Try another method, or compare methods.", icon="⚠️")
    elif old and post["target_prob"] - old.get("prob", 0.0) < DEFAULT_THRESHOLD:
        st.warning(f"A weak flip: p(new target) {post['target_prob']:.3f} against the old answer "
                   f"{token(old['token'])} {old['prob']:.3f}.", icon="⚠️")
    change = service.last_change or {}
    if change.get("kind") in ("edit", "import") and change.get("edit_ids") == [record.id]:
        threshold = st.session_state.get("probe_threshold", DEFAULT_THRESHOLD)
        moved = [r for r in service.probe_changes()
                 if r["before"] is not None and r["prompt"] != record.request.prompt and flagged(r, threshold)]
        if moved:
            st.warning("This edit also moved probes: " + "; ".join(
                f"{md(r['prompt'])}: {md(shift_text(r))}{' (top answer changed)' if r['flipped'] else ''}"
                for r in moved), icon="⚠️")


def timing_text(record, origin: dict) -> str:
    timings = record.timings
    if origin.get("kind") == "import":
        original = origin.get("timings") or {}
        return (f"Imported from {origin.get('file') or 'a file'}; the original edit took "
                f"{original.get('edit_ms', float('nan')) / 1000:.1f} s (compute "
                f"{original.get('compute_ms', float('nan')) / 1000:.1f} s); the import "
                f"{timings.get('edit_ms', float('nan')) / 1000:.1f} s.")
    compute = (origin.get("timings") or {}).get("compute_ms") if origin.get("kind") == "preview" else None
    parts = [f"compute {(compute if compute is not None else timings.get('compute_ms', 0)) / 1000:.2f} s"
             + (" (in the comparison)" if compute is not None else "")]
    if "guard_ms" in timings:
        parts.append(f"drift guard {timings['guard_ms'] / 1000:.2f} s")
    parts.append(f"scoring {timings.get('score_ms', 0) / 1000:.2f} s")
    drift = f"; drift {record.drift:.3f}× the base model's perplexity" if record.drift else ""
    return f"Edit took {timings.get('edit_ms', 0) / 1000:.2f} s: " + ", ".join(parts) + drift + "."


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


def _prediction_block(title: str, top: list[dict], text: str | None) -> None:
    first = top[0] if top else {"token": "", "prob": 0.0}
    st.markdown(f"**{title}:** top prediction {md(token(first['token']))} (p = {first['prob']:.3f})")
    st.table(top_table(top))
    if text is not None:
        st.caption("Greedy continuation")
        show_text(text)


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
