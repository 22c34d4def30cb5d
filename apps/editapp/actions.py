"""The slow actions of the page (apply an edit, preview it, apply a preview, compare methods), queued by
their button's callback and run in the script at their section's status line: a fixed-height slot right
under the button, so progress and the result show where the click was, and never push the page down.

The status line states the action's outcome ("Edit 3f2a applied.", "The preview failed: see below.")
so it cannot contradict the message under it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import streamlit as st

from factedit import FacteditError, InvalidRequestError
from factedit.session import EditSession

from .methods import changed_settings, stored_overrides
from .neighbours import neighbours
from .progress import Ticker
from .ui import flash, lines, note_timing, run_action

logger = logging.getLogger(__name__)

EDIT, COMPARE = "edit", "compare"  # the sections that run actions (their messages and status lines)


def queue(action: str, section: str, **details: Any) -> None:
    """A button's callback: run `action` in this run's script, at `section`'s status line."""
    st.session_state["pending"] = {"action": action, "section": section, **details}


def fact(prefix: str = "edit") -> dict[str, Any]:
    """The fact typed in a form: `edit_*` (the edit form) or `compare_*` (the compare form)."""
    state = st.session_state
    return {"prompt": state.get(f"{prefix}_prompt") or "", "target": state.get(f"{prefix}_target") or "",
            "paraphrases": lines(state.get(f"{prefix}_paraphrases")),
            "locality": lines(state.get(f"{prefix}_locality"))}


def run_pending(service: EditSession, section: str, status) -> None:
    """Run the queued action if it belongs to `section`, reporting in `status` (an st.empty)."""
    pending = st.session_state.get("pending")
    if pending is None or pending.get("section") != section:
        return
    del st.session_state["pending"]
    action = pending["action"]
    note_timing(action=action, action_start=time.time())
    runners: dict[str, Callable[..., str]] = {"edit": _do_edit, "preview": _do_preview, "confirm": _do_confirm,
                                              "compare": _do_compare, "apply_compared": _do_apply_compared}
    outcome = runners[action](service, status, **{k: v for k, v in pending.items() if k not in ("action", "section")})
    status.caption(outcome)
    note_timing(action_end=time.time())


def _do_edit(service: EditSession, status) -> str:
    """Apply without preview: compute and apply in one call."""
    method, typed = st.session_state.get("edit_method"), fact()
    overrides = run_action(EDIT, f"The settings of {method}", lambda: stored_overrides(service, method))
    if overrides is None:
        return "The edit was not made: see below."
    start = time.perf_counter()
    with Ticker(status, f"Editing with {method} ({changed_settings(overrides)})") as ticker:
        outcome = run_action(EDIT, "The edit", lambda: service.edit(
            method, typed["prompt"], typed["target"], typed["paraphrases"], typed["locality"],
            overrides=overrides, progress=ticker.report, predict=False))
    note_timing(method=method, session_s=time.perf_counter() - start,
                editor=dict(outcome.record.timings) if outcome is not None else None)
    if outcome is None:
        return "The edit failed: see below."
    st.session_state.pop("preview", None)  # fitted to the weights before this edit
    select(outcome.record.id)
    ms = outcome.record.timings.get("edit_ms", float("nan"))
    flash(EDIT, "success", f"Edit {outcome.record.id} applied with {method} in {ms / 1000:.1f} s.")
    return f"Edit {outcome.record.id} applied."


def _do_preview(service: EditSession, status) -> str:
    """Compute the chosen method's delta and score it (prompt, paraphrases, locality prompts, probes and
    automatic neighbours), nothing applied; the preview panel shows it with a confirm button."""
    method, typed = st.session_state.get("edit_method"), fact()
    overrides = run_action(EDIT, f"The settings of {method}", lambda: stored_overrides(service, method))
    if overrides is None:
        return "Nothing was previewed: see below."
    probes = service.probes
    extra = neighbours(typed["prompt"], probes, [*probes, *typed["paraphrases"], *typed["locality"]])
    start = time.perf_counter()
    with Ticker(status, f"Previewing the {method} edit (nothing is applied)") as ticker:
        preview = run_action(EDIT, "The preview", lambda: service.preview(
            method, typed["prompt"], typed["target"], typed["paraphrases"], typed["locality"],
            overrides=overrides, probes=[*probes, *extra], progress=ticker.report))
    note_timing(method=method, session_s=time.perf_counter() - start,
                editor=dict(preview.timings) if preview is not None else None)
    if preview is None:
        st.session_state.pop("preview", None)
        return "The preview failed: see below."
    st.session_state["preview"] = {"version": service.version, "preview": preview, "neighbours": extra,
                                   "settings": overrides, "method": method}
    return (f"Previewed the {method} edit in {preview.timings['compute_ms'] / 1000:.1f} s: nothing applied yet; "
            "apply it below.")


def _do_confirm(service: EditSession, status) -> str:
    """Apply the previewed delta as it was computed."""
    shown = st.session_state.pop("preview", None)
    if shown is None:
        flash(EDIT, "error", "There is no preview to apply any more (another click got there first); preview again.")
        return "Nothing was applied: see below."
    return apply_preview(service, status, shown["preview"], EDIT, "previewed")


def apply_preview(service: EditSession, status, preview, section: str, how: str) -> str:
    """Apply a preview's delta (not computed again); the drift guard measures the model meanwhile."""
    status.progress(0.5, text=f"Applying the {how} {preview.method} edit (the drift guard measures the model)…")
    start = time.perf_counter()
    outcome = run_action(section, f"Applying the {preview.method} edit", lambda: service.apply_preview(
        preview, predict=False))
    note_timing(method=preview.method, session_s=time.perf_counter() - start,
                editor=dict(outcome.record.timings) if outcome is not None else None)
    if outcome is None:
        return "Nothing was applied: see below."
    select(outcome.record.id)
    flash(section, "success", f"Edit {outcome.record.id} applied: the {preview.method} edit as {how} (computed "
                              f"in {preview.timings['compute_ms'] / 1000:.1f} s, not again).")
    return f"Edit {outcome.record.id} applied."


def _do_compare(service: EditSession, status) -> str:
    methods, typed = list(st.session_state.get("compare_methods") or []), fact("compare")
    if not methods:
        flash(COMPARE, "error", "Choose at least one method to compare.")
        return "Nothing was compared: see below."
    previews, errors, settings = {}, {}, {}
    for index, method in enumerate(methods):
        label = f"Comparing {index + 1}/{len(methods)}: {method}"
        try:
            settings[method] = stored_overrides(service, method)
            with Ticker(status, label, index / len(methods), 1 / len(methods)) as ticker:
                previews[method] = service.preview(method, typed["prompt"], typed["target"],
                                                   overrides=settings[method], progress=ticker.report)
        except InvalidRequestError as exc:  # bad input: every method refuses it alike
            flash(COMPARE, "error", f"The comparison failed: {exc}")
            return "The comparison failed: see below."
        except FacteditError as exc:
            errors[method] = str(exc)
        except Exception as exc:  # one method failing must not lose the others
            logger.exception("preview with %s failed", method)
            errors[method] = f"{type(exc).__name__}: {exc}"
    st.session_state["comparison"] = {"version": service.version, **typed, "previews": previews,
                                      "errors": errors, "settings": settings}
    if not previews:
        flash(COMPARE, "error", "The comparison failed: " + "; ".join(f"{m}: {e}" for m, e in errors.items()))
        return "The comparison failed: see below."
    failed = f"; {len(errors)} could not compute it (below)" if errors else ""
    return f"Compared {len(previews)} method(s){failed}: nothing applied; apply one below."


def _do_apply_compared(service: EditSession, status, method: str) -> str:
    comparison = st.session_state.get("comparison") or {}
    preview = comparison.get("previews", {}).get(method)
    if preview is None:
        flash(COMPARE, "error", f"No compared {method} edit to apply; compare again.")
        return "Nothing was applied: see below."
    return apply_preview(service, status, preview, COMPARE, "compared")


def select(edit_id: str) -> None:
    """Make `edit_id` the selected edit (the history, the diff and the try box follow it).

    The selection lives in the session state, not in the selectbox's own state: a rerun request that the
    browser sent before the page showed the new selection (the sync timer's, say) carries the old value
    of the selectbox and would put it back. The selectbox gets a new key instead (history_view.py)."""
    state = st.session_state
    state["selection"] = edit_id
    state["selection_nonce"] = state.get("selection_nonce", 0) + 1
