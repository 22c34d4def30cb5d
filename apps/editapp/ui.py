"""Small Streamlit helpers shared by the views: inline errors, one-shot messages, token formatting."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import streamlit as st

import factedit

logger = logging.getLogger(__name__)

HIGHLIGHT = "background-color: #ffe08a"


def run_action(section: str, action: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` (a button callback's work); keep its outcome as a message for `section`.

    Errors never escape: factedit's own errors show their message, anything else its type too.
    """
    try:
        result = fn()
    except factedit.FacteditError as exc:
        flash(section, "error", f"{action} failed: {exc}")
        return None
    except Exception as exc:  # the app must not crash; the log keeps the traceback
        logger.exception("%s failed", action)
        flash(section, "error", f"{action} failed: {type(exc).__name__}: {exc}")
        return None
    return result


def flash(section: str, kind: str, text: str) -> None:
    st.session_state.setdefault("_messages", {})[section] = (kind, text)


def show_messages(section: str) -> None:
    """Show (once) the message an action left for `section`."""
    kind, text = st.session_state.get("_messages", {}).pop(section, (None, None))
    if kind == "error":
        st.error(text, icon="⚠️")
    elif kind == "success":
        st.success(text)
    elif kind == "info":
        st.info(text)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-!|~$])")


def md(text: str) -> str:
    """`text` escaped for st.markdown: prompts and tokens are shown as typed (no emphasis, no LaTeX)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def token(text: str) -> str:
    """A token shown with its quotes, so a leading space is visible: `' Paris'`."""
    return repr(text)


def top_table(top: Sequence[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"token": [token(t["token"]) for t in top], "p": [f"{t['prob']:.3f}" for t in top]},
        index=range(1, len(top) + 1),
    )


def highlight_rows(frame: pd.DataFrame, flag_column: str):
    """A Styler that colours the rows whose `flag_column` is truthy."""
    def colour(row: pd.Series) -> list[str]:
        return [HIGHLIGHT if row[flag_column] else ""] * len(row)

    return frame.style.apply(colour, axis=1)


def lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]
