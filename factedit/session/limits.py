"""`RequestLimits`: how much one edit may ask of a session, checked before anything runs.

The same limits hold for every way an edit arrives (the app, `POST /v1/edits`, an imported edit file),
so an import cannot carry more than an edit may.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import LimitError
from ..core.request import EditRequest


@dataclass(frozen=True)
class RequestLimits:
    max_facts: int = 64  # facts in one edit
    max_paraphrases: int = 16  # paraphrases per fact
    max_locality: int = 16  # locality prompts per fact
    max_text_chars: int = 2000  # characters of one prompt, target, subject, paraphrase or locality prompt

    def check(self, requests: Sequence[EditRequest]) -> None:
        """LimitError naming the first limit `requests` exceed."""
        if len(requests) > self.max_facts:
            raise LimitError(f"at most {self.max_facts} facts per edit, not {len(requests)}")
        for i, request in enumerate(requests):
            where = f"fact {i}" if len(requests) > 1 else "the fact"
            if len(request.paraphrases) > self.max_paraphrases:
                raise LimitError(f"{where}: at most {self.max_paraphrases} paraphrases, not {len(request.paraphrases)}")
            if len(request.locality) > self.max_locality:
                raise LimitError(f"{where}: at most {self.max_locality} locality prompts, not {len(request.locality)}")
            texts = [request.prompt, request.target, request.subject or "", *request.paraphrases, *request.locality]
            if any(len(text) > self.max_text_chars for text in texts):
                raise LimitError(f"{where}: a text is longer than {self.max_text_chars} characters")
