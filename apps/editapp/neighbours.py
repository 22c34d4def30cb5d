"""A few automatic neighbours of an edit, derived cheaply from the probes: the edit's relation asked of
the probes' subjects, and the probes' relations asked of the edit's subject. "The capital of France is"
with the probe "The official language of Spain is" gives "The capital of Spain is" (same relation) and
"The official language of France is" (same subject). A subject is the first run of capitalised words
after the first word; a swap is skipped where an article would be left in front of a name."""

from __future__ import annotations

import re
from collections.abc import Iterable

SAME_RELATION, SAME_SUBJECT = "same relation", "same subject"
_NAME = re.compile(r"\b[A-Z][\w'-]*(?: [A-Z][\w'-]*)*")
_ARTICLE = re.compile(r"\b(the|a|an)\s$", re.IGNORECASE)


def subject_of(prompt: str) -> str | None:
    """The first capitalised run after the prompt's first word ("France", "Eiffel Tower"), or None."""
    for match in _NAME.finditer(prompt):
        if match.start() > 0:
            return match.group(0)
    return None


def _swap(prompt: str, old: str, new: str) -> str | None:
    """`prompt` with its first `old` replaced by `new`; None where an article stands before it."""
    at = prompt.find(old)
    if at < 0 or _ARTICLE.search(prompt[:at]):
        return None
    return prompt[:at] + new + prompt[at + len(old):]


def neighbours(prompt: str, probes: Iterable[str], known: Iterable[str] = (), per_kind: int = 2) -> dict[str, str]:
    """{neighbour prompt: SAME_RELATION or SAME_SUBJECT}, at most `per_kind` of each, none of them the
    prompt itself or one of `known` (probes, paraphrases, locality prompts: scored already)."""
    subject = subject_of(prompt)
    if subject is None:
        return {}
    seen = {prompt.strip(), *(k.strip() for k in known)}
    found: dict[str, str] = {}
    counts = {SAME_RELATION: 0, SAME_SUBJECT: 0}
    for probe in probes:
        other = subject_of(probe)
        if other is None or other == subject:
            continue
        swaps = ((SAME_RELATION, _swap(prompt, subject, other)), (SAME_SUBJECT, _swap(probe, other, subject)))
        for kind, text in swaps:
            if text is None or text.strip() in seen or counts[kind] >= per_kind:
                continue
            seen.add(text.strip())
            found[text] = kind
            counts[kind] += 1
    return found
