"""Tokens as people read them: no Python quotes, special tokens by what they mean, and the leading space
shown only where it tells two tokens apart. Plain Python (no Streamlit): the browser helpers use it too."""

from __future__ import annotations

import re
from collections.abc import Sequence

SPACE_MARK = "␣"  # a visible space, where a leading space tells two shown tokens apart
_SPECIAL = re.compile(r"^<\|?[\w/.-]+\|?>$")  # <|im_end|>, <|endoftext|>, </s>, <eos>, ...
_NAMES = {"<|im_end|>": "(end of turn)", "<|eot_id|>": "(end of turn)", "<|im_start|>": "(start of turn)",
          "<|endoftext|>": "(end of text)", "</s>": "(end of text)", "<eos>": "(end of text)",
          "<|end_of_text|>": "(end of text)", "<s>": "(start of text)", "<bos>": "(start of text)"}


def readable(token: str) -> str:
    """" Paris" -> "Paris", "\\n" -> "(new line)", "<|im_end|>" -> "(end of turn)", "" -> "(nothing)", a
    token of some bytes of a character ("\\ufffd" when decoded alone) -> "(part of a character)"."""
    if token in _NAMES:
        return _NAMES[token]
    if _SPECIAL.match(token):
        return f"(control token {token.strip('<>|')})"
    if not token:
        return "(nothing)"
    if not token.strip():
        return _whitespace(token)
    if "\ufffd" in token:  # a token that holds only some bytes of a character: nothing readable on its own
        return "(part of a character)"
    return token.strip()


def _whitespace(token: str) -> str:
    lines = token.count("\n")
    if lines:
        return "(new line)" if lines == 1 else f"({lines} new lines)"
    if "\t" in token:
        return "(tab)"
    return "(space)" if len(token) == 1 else f"({len(token)} spaces)"


def readable_all(tokens: Sequence[str]) -> list[str]:
    """`readable` of each, with "␣" before those whose leading space is what tells them from another in
    the list (" Paris" and "Paris" -> "␣Paris", "Paris")."""
    shown = [readable(t) for t in tokens]
    clashes = {s for s in shown if shown.count(s) > 1}
    return [SPACE_MARK + s if s in clashes and t[:1].isspace() else s for s, t in zip(shown, tokens, strict=True)]
