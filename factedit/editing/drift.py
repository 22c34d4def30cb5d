"""Drift of the whole model: perplexity of reference text, against the base model's, and the guard.

`reference_perplexity` is the perplexity of text sampled from the unedited default model
(`reference.py`); divided by the base model's value it is the drift ratio that evaluation reports and
the guard bounds (1.0 = unchanged; collapsing models reach 10-10⁹).

The guard (`DriftGuard`) measures the ratio on a few of those texts (the next few and the worst so
far, at each check) after an edit is applied and, past `max_ratio`, has the Editor undo the edit and
raise `DriftError` with the numbers: nothing changed, nothing journaled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .errors import ConfigError, DriftError
from .reference import reference_texts
from .request import max_context
from .scoring import pad_id_of, pad_sequences


@torch.no_grad()
def reference_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int | None = None,
    batch_size: int = 16,
    params: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """exp(mean NLL) over every predicted token of `texts` (each cut at `max_tokens`).

    `params` replace some of the model's tensors (through `functional_call`; the model is not written),
    e.g. base values to measure the unedited model while edits are applied.
    """
    device = next(model.parameters()).device
    limits = [x for x in (max_tokens, max_context(model.config)) if x is not None]
    limit = min(limits) if limits else None
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t).input_ids[:limit] for t in texts[start : start + batch_size]]
        ids, mask = pad_sequences([e for e in encoded if len(e) > 1], pad_id_of(tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if params:
            on_device = {name: value.to(device) for name, value in params.items()}
            logits = torch.func.functional_call(model, on_device, args=(), kwargs=kwargs, strict=False).logits
        else:
            logits = model(**kwargs).logits  # (B, T, V)
        logprobs = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V): position t predicts t + 1
        picked = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        valid = mask[:, 1:].bool()
        total -= float(picked[valid].double().sum())
        count += int(valid.sum())
    return math.exp(total / max(count, 1))


@dataclass(frozen=True)
class GuardConfig:
    """The Editor's drift guard. `max_ratio`: largest allowed perplexity of the reference text after an
    edit, over the base model's; `texts`/`max_tokens`: how much of the shipped samples it reads (the
    cost of one forward pass over texts × max_tokens tokens per edit, reported as `guard_ms`)."""

    max_ratio: float = 1.5
    texts: int = 4
    max_tokens: int = 48

    def __post_init__(self) -> None:
        if not (isinstance(self.max_ratio, (int, float)) and self.max_ratio > 1.0):
            raise ConfigError(f"guard max_ratio must be a number > 1, got {self.max_ratio!r}")
        if not (isinstance(self.texts, int) and self.texts >= 1 and isinstance(self.max_tokens, int)
                and self.max_tokens >= 2):
            raise ConfigError("guard texts must be an int >= 1 and max_tokens an int >= 2")


class DriftGuard:
    """Measures drift against the base model's perplexity (see module docstring).

    The shipped samples are split into groups of `texts`. Each check reads the next group in turn and
    the group that read worst so far, and answers the larger ratio. Reading always the same few would
    let edits that spare them through while the rest drifts; reading only the next group lets edits
    through whenever it happens to be a mild one (a selection effect: after 1,000 attempted sequential
    `mend` edits, all 64 texts were at 2.7× under a 1.5× bound). The base model's perplexity of each
    group is measured the first time the group is read.
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        samples = reference_texts("samples")
        size = min(config.texts, len(samples))
        self.groups = [samples[i : i + size] for i in range(0, len(samples) - size + 1, size)]
        self._base: dict[int, float] = {}  # group index -> the base model's perplexity of it
        self._last: dict[int, float] = {}  # group index -> its ratio when last read
        self._next = 0
        self.base_perplexity: float | None = None  # of the worst group of the last check

    def ratio(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, base_params: Mapping[str, torch.Tensor]
    ) -> float:
        """The larger perplexity ratio, over the base model's, of the next group of texts and of the
        worst group so far; `base_params` hold the base values of the parameters edits have touched
        (used once per group)."""
        index, self._next = self._next, (self._next + 1) % len(self.groups)
        worst = max(self._last, key=self._last.__getitem__, default=index)
        for group in dict.fromkeys((index, worst)):
            texts = self.groups[group]
            if group not in self._base:
                self._base[group] = reference_perplexity(
                    model, tokenizer, texts, max_tokens=self.config.max_tokens, params=base_params
                )
            now = reference_perplexity(model, tokenizer, texts, max_tokens=self.config.max_tokens)
            self._last[group] = now / self._base[group]
        group = max((index, worst), key=self._last.__getitem__)
        self.base_perplexity = self._base[group]
        return self._last[group]

    def check(self, ratio: float, what: str) -> None:
        """Raise DriftError when `ratio` is past the bound (or not a number)."""
        if not ratio <= self.config.max_ratio:  # NaN fails too
            raise DriftError(
                f"{what} would raise the perplexity of the reference text to {ratio:.3g}× the base model's "
                f"(the guard allows {self.config.max_ratio:g}×, base perplexity {self.base_perplexity:.3f}); "
                "it was undone and not journaled. Try another method, fewer facts at once, or raise the "
                "bound with Editor(..., guard=GuardConfig(max_ratio=...)) / guard=None.",
                ratio=ratio, max_ratio=self.config.max_ratio,
            )
