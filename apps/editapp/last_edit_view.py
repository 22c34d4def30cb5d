"""The newest edit of the journal (made in any tab, or imported), with its before/after: top predictions,
p(new target) and p(old answer), paraphrases and locality prompts, the probes it moved, and its timings."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from factedit.session import EditOutcome, EditSession

from .charts import AFTER, BEFORE, probability_chart
from .preview_view import DEFAULT_THRESHOLD
from .ui import flagged, highlight_rows, md, shift_text, show_text, token, top_table


def render_last_edit(service: EditSession) -> None:
    records = service.history()
    if records:
        _last_edit(service, records[-1])


def _last_edit(service: EditSession, record) -> None:
    """The newest edit of the journal (made in any tab, or imported), named by its id, with its status."""
    origin = service.origin(record.id) or {}
    outcome: EditOutcome | None = service.outcome(record.id)
    request = record.request
    imported = f", imported from edit `{origin.get('source_id')}`" if origin.get("kind") == "import" else ""
    st.markdown(f"**Last edit** `{record.id}` ({record.method}, {record.status}{imported}): "
                f"{md(request.prompt)} → **{md(token(request.target))}**")
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
                   f"p(new target) is {post['target_prob']:.3f}. Try another method, or compare methods below.",
                   icon="⚠️")
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
    parts = [] if origin.get("kind") == "preview" else [f"compute {timings.get('compute_ms', 0) / 1000:.2f} s"]
    if "guard_ms" in timings:
        parts.append(f"drift guard {timings['guard_ms'] / 1000:.2f} s")
    parts.append(f"scoring {timings.get('score_ms', 0) / 1000:.2f} s")
    drift = (f"; the drift guard read {record.drift:.3f}× the base model's perplexity on its texts"
             if record.drift else "")
    text = f"Edit took {timings.get('edit_ms', 0) / 1000:.2f} s: " + ", ".join(parts) + drift + "."
    if origin.get("kind") == "preview":  # the delta was computed before the click that applied it
        computed = (origin.get("timings") or {}).get("compute_ms", float("nan")) / 1000
        text = f"Computed in the preview in {computed:.2f} s, then applied: " + text[0].lower() + text[1:]
    return text


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
    st.markdown(f"**{title}:** top prediction **{md(token(first['token']))}** (p = {first['prob']:.3f})")
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
