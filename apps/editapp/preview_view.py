"""The preview of an edit, right under the button that made it: what the edit would do, in plain words
first (does it take; which probe or neighbour it would break), then prompt by prompt; and the confirm
button that applies exactly that delta (not computed again)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from factedit.editing.preview import EDIT, LOCALITY, PARAPHRASE, EditPreview
from factedit.session import EditSession

from .actions import EDIT as SECTION
from .actions import queue
from .ui import HIGHLIGHT, answer, flagged, md, shift_text, token

DEFAULT_THRESHOLD = 0.1  # the probes' default: a probability moved by this much is flagged


def threshold() -> float:
    return float(st.session_state.get("probe_threshold", DEFAULT_THRESHOLD))


def render_preview(service: EditSession) -> None:
    """The preview kept in the session state, if any, with its confirm and discard buttons."""
    shown = st.session_state.get("preview")
    if not shown:
        return
    preview: EditPreview = shown["preview"]
    stale = shown["version"] != service.version
    with st.container(border=True):
        request = preview.requests[0]
        st.markdown(f"**Preview of the {preview.method} edit** {md(request.prompt)} → **{md(token(request.target))}**"
                    " · nothing is applied yet")
        if stale:
            st.info("The weights changed since this preview (an edit, a revert or an import): its delta was fitted "
                    "to the weights as they were and can no longer be applied. Preview again.")
        for kind, text in verdict(preview, shown["neighbours"], threshold()):
            (st.warning if kind == "warning" else st.success if kind == "success" else st.markdown)(text)
        confirm, discard, _ = st.columns([2, 1, 3])
        refused = preview.guard_refuses
        confirm.button("Apply this edit", key="confirm_preview", type="primary", disabled=stale or refused,
                       on_click=queue, args=("confirm", SECTION),
                       help="The drift guard would refuse it (above)." if refused else None)
        discard.button("Discard", key="discard_preview", on_click=st.session_state.pop, args=("preview", None))
        with st.expander("Prompt by prompt", expanded=False):
            frame, flags = preview_frame(preview, shown["neighbours"], threshold())
            st.table(frame.style.apply(lambda row: [HIGHLIGHT if flags[row.name] else ""] * len(row), axis=1))
        st.caption(f"Computed in {preview.timings['compute_ms'] / 1000:.2f} s, scored"
                   f"{' and the drift read' if preview.drift is not None else ''} in "
                   f"{preview.timings.get('score_ms', 0) / 1000:.2f} s (applying it measures neither again); layers "
                   f"{', '.join(map(str, preview.layers))}; ‖Δ‖_F {preview.norm:.4g}.")


def verdict(preview: EditPreview, extra: dict[str, str], limit: float) -> list[tuple[str, str]]:
    """(kind, markdown) lines: whether the edit takes, its paraphrases, and every other prompt it would
    change (a new top answer, or a probability moved by at least `limit`)."""
    lines = [_takes(preview, limit)]
    if preview.drift is not None:
        lines.append(_drift(preview))
    paraphrases = [r for r in preview.rows if r["kind"] == PARAPHRASE]
    if paraphrases:
        taken = sum(_target_is_top(r) for r in paraphrases)
        lines.append(("info", f"Paraphrases: the new target is the top answer for {taken} of {len(paraphrases)}."))
    others = [r for r in preview.rows if r["kind"] not in (EDIT, PARAPHRASE)]
    broken = [r for r in others if flagged(r, limit)]
    for row in broken:
        lines.append(("warning", f"It would also change {_kind(row, extra)} “{md(row['prompt'])}”: {_change(row)}"))
    if not broken:
        lines.append(("success", f"None of the {len(others)} other prompts (probes, automatic neighbours"
                                 f"{', locality prompts' if any(r['kind'] == LOCALITY for r in others) else ''}) "
                                 f"changes its answer or moves by {limit:.2f} or more."))
    return lines


def _drift(preview: EditPreview) -> tuple[str, str]:
    """What the drift guard would say, read with the delta added (the apply takes this reading over)."""
    text = (f"the perplexity of the reference text would be **{preview.drift:.3f}×** the base model's (the guard "
            f"allows {preview.max_drift:g}×)")
    if preview.guard_refuses:
        return "warning", f"The drift guard would refuse this edit: {text}. Try another method or other settings."
    return "info", f"Drift: {text}."


def _target_is_top(row: dict[str, Any]) -> bool:
    """Whether the row's top answer with the edit is the (first word of the) target."""
    return bool(row["after"]) and (row["target"] or "").strip().startswith(token(row["after"][0]["token"]))


def _takes(preview: EditPreview, limit: float) -> tuple[str, str]:
    row = preview.edit_row
    old, new_top = row["old"], row["after"][0]
    target = md(token(row["target"] or ""))
    if _target_is_top(row):
        text = (f"With this edit the model would answer **{target}** (p {row['target_after']:.3f}, before "
                f"{row['target_before']:.3f}); **{md(token(old['token']))}** falls {old['before']:.3f} → "
                f"{old['after']:.3f}.")
        weak = row["target_after"] - old["after"] < limit
        return ("warning", "A weak flip. " + text) if weak else ("success", text)
    return ("warning", f"The edit would not take: the top answer would be **{md(token(new_top['token']))}** "
                       f"(p {new_top['prob']:.3f}) and p({target}) only {row['target_after']:.3f}. Try another method "
                       "or other settings (or compare methods below).")


def _kind(row: dict[str, Any], extra: dict[str, str]) -> str:
    if row["prompt"] in extra:
        return f"a neighbour ({extra[row['prompt']]})"
    return "the locality prompt" if row["kind"] == LOCALITY else "the probe"


def _change(row: dict[str, Any]) -> str:
    old = row["old"]
    before = f"**{md(token(old['token']))}** ({old['before']:.3f})"
    if row["flipped"]:
        new = row["after"][0]
        return (f"its answer goes from {before} to **{md(token(new['token']))}** ({new['prob']:.3f}); "
                f"{md(token(old['token']))} falls to {old['after']:.3f}.")
    return f"it keeps {before} but a probability moves: {md(shift_text(row))}."


def preview_frame(preview: EditPreview, extra: dict[str, str], limit: float) -> tuple[pd.DataFrame, dict[int, bool]]:
    """One row per prompt scored: what it is, its answer now, with the edit, the largest change; and which
    rows to highlight (flagged)."""
    rows, flags = [], {}
    for index, row in enumerate(preview.rows):
        kind = f"neighbour, {extra[row['prompt']]}" if row["prompt"] in extra else row["kind"]
        rows.append({"prompt": row["prompt"], "what": kind, "now": answer(row["before"]),
                     "with the edit": answer(row["after"]), "largest change": shift_text(row)})
        flags[index] = row["kind"] not in (EDIT, PARAPHRASE) and flagged(row, limit)
    return pd.DataFrame(rows), flags
