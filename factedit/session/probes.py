"""`ProbeList`: the probe prompts every user of a session shares, kept in a JSON file, and what they
answered just before the last change of the weights, to show what that change moved."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..core.atomic import write_text
from ..core.errors import ConfigError
from ..editing.preview import compare_prompts
from ..scoring.sequences import top_tokens

logger = logging.getLogger(__name__)

MAX_PROBES = 20


class ProbeList:
    """Args:
    path: the JSON file the list is kept in (a missing or unreadable one: `defaults`).
    defaults: the list before any is saved.
    """

    def __init__(self, path: Path, defaults: Sequence[str]) -> None:
        self.path = path
        self.prompts = self._load(defaults)
        # (probes, their next-token log-distributions) just before the last change (set by the session).
        self.before: tuple[tuple[str, ...], list[torch.Tensor]] | None = None

    def _load(self, defaults: Sequence[str]) -> list[str]:
        try:
            prompts = json.loads(self.path.read_text())
            if isinstance(prompts, list) and all(isinstance(p, str) for p in prompts):
                return prompts
        except (OSError, ValueError):
            pass
        return list(defaults)

    def set(self, prompts: Sequence[str]) -> None:
        """Use `prompts` (stripped, blank and repeated ones dropped) and save them."""
        cleaned = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
        if len(cleaned) > MAX_PROBES:
            raise ConfigError(f"at most {MAX_PROBES} probes; remove some first")
        self.prompts = cleaned
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps(cleaned, indent=1))
        except OSError as exc:  # only persistence is lost
            logger.warning("could not save the probe list to %s: %s", self.path, exc)

    def before_rows(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, dict[str, Any]]:
        """`top_rows` of the probes just before the last change, by prompt ({} before the first)."""
        if self.before is None:
            return {}
        return {row["prompt"]: row for row in top_rows(tokenizer, *self.before)}

    def changes(
        self, tokenizer: PreTrainedTokenizerBase, probes: Sequence[str], logprobs: Sequence[torch.Tensor],
    ) -> list[dict[str, Any]]:
        """`probes` scored now (`logprobs`) against just before the last change: `compare_prompts` rows;
        a probe added since has "before" None."""
        before = dict(zip(*self.before, strict=True)) if self.before else {}
        rows = []
        for prompt, now in zip(probes, logprobs, strict=True):
            prior = before.get(prompt, now)
            row = compare_prompts(tokenizer, [("probe", prompt, None)], [(prior, None)], [(now, None)])[0]
            rows.append(row if prompt in before else {**row, "before": None})
        return rows


def top_rows(
    tokenizer: PreTrainedTokenizerBase, probes: Sequence[str], logprobs: Sequence[torch.Tensor],
) -> list[dict[str, Any]]:
    """[{"prompt", "top"}] for every probe, its top-5 next tokens from its log-distribution."""
    return [{"prompt": p, "top": top_tokens(tokenizer, lp, 5)} for p, lp in zip(probes, logprobs, strict=True)]
