"""Small Streamlit helpers shared by the views: inline errors, one-shot messages, token formatting."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import streamlit as st

import factedit

from .tokens import readable, readable_all

logger = logging.getLogger(__name__)

HIGHLIGHT = "background-color: #ffe08a"
TIMINGS_ENV = "FACTEDIT_APP_TIMINGS"  # a file: the app appends one JSON line per action (measure_edit_to_screen.py)


def run_action(section: str, action: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` (a button callback's work); keep its outcome as a message for `section`.

    Errors never escape: factedit's own errors show their message, anything else its type too.
    """
    try:
        result = fn()
    except factedit.DriftError as exc:
        flash(section, "error", f"{action} was refused by the drift guard: {exc}")
        return None
    except factedit.FacteditError as exc:
        flash(section, "error", f"{action} failed: {exc}")
        return None
    except Exception as exc:  # the app must not crash; the log keeps the traceback
        logger.exception("%s failed", action)
        flash(section, "error", f"{action} failed: {type(exc).__name__}: {exc}")
        return None
    return result


def flash(section: str, kind: str, text: str) -> None:
    """Leave a message for `section`; messages of several actions before the next run all show."""
    st.session_state.setdefault("_messages", {}).setdefault(section, []).append((kind, text))


def show_messages(section: str) -> None:
    """Show (once) the messages actions left for `section`, in order."""
    for kind, text in st.session_state.get("_messages", {}).pop(section, []):
        if kind == "error":
            st.error(text, icon="⚠️")
        elif kind == "warning":
            st.warning(text, icon="⚠️")
        elif kind == "success":
            st.success(text)
        else:
            st.info(text)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-!|~$])")


def md(text: str) -> str:
    """`text` escaped for st.markdown: prompts and tokens are shown as typed (no emphasis, no LaTeX)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def token(text: str) -> str:
    """A token as people read it (tokens.py): "Paris", "(end of turn)", "(new line)"."""
    return readable(text)


def top_table(top: Sequence[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"token": readable_all([t["token"] for t in top]), "p": [f"{t['prob']:.3f}" for t in top]},
        index=range(1, len(top) + 1),
    )


def highlight_rows(frame: pd.DataFrame, flag_column: str):
    """A Styler that colours the rows whose `flag_column` is truthy."""
    def colour(row: pd.Series) -> list[str]:
        return [HIGHLIGHT if row[flag_column] else ""] * len(row)

    return frame.style.apply(colour, axis=1)


def lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def show_text(text: str) -> None:
    """Generated text as written: newlines as line breaks, nothing read as markdown."""
    st.code(text or " ", language=None, wrap_lines=True)


def probability(p: float | None) -> str:
    return "?" if p is None else f"{p:.3f}"


def answer(top: Sequence[dict[str, Any]] | None) -> str:
    """The top-1 of a top-k list as "' Paris' 0.773"."""
    if not top:
        return ""
    return f"{token(top[0]['token'])} {top[0]['prob']:.3f}"


def shift_text(row: dict[str, Any]) -> str:
    """A `compare_prompts` row's largest probability change: "' Rome' 0.380→0.545 (+0.165)"."""
    moved = row["shift_token"]
    return f"{token(moved['token'])} {moved['before']:.3f}→{moved['after']:.3f} ({row['shift']:+.3f})"


def flagged(row: dict[str, Any], threshold: float) -> bool:
    """Whether a compare row moved enough to flag: the top-1 flipped or some token moved ≥ threshold."""
    return bool(row.get("flipped")) or abs(row.get("shift", 0.0)) >= threshold


def note_timing(**fields: Any) -> None:
    """Keep timings of this run's action; `write_timing` writes them when the page that shows it is done."""
    if os.environ.get(TIMINGS_ENV):
        st.session_state.setdefault("_timing", {}).update(fields)


def write_timing(page_start: float) -> None:
    """At the end of a page run: append the pending action's timings (and this run's) to $FACTEDIT_APP_TIMINGS."""
    path = os.environ.get(TIMINGS_ENV)
    timing = st.session_state.get("_timing")
    if not path or not timing or "action_end" not in timing:
        return
    del st.session_state["_timing"]
    line = {**timing, "page_start": page_start, "page_end": time.time()}
    try:
        with open(path, "a") as out:
            out.write(json.dumps(line) + "\n")
    except OSError as exc:
        logger.warning("could not write timings to %s: %s", path, exc)
