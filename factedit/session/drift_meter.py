"""The session's own drift figure, measured again after every change of the weights (an edit, a
revert, an import): the perplexity of a few fixed reference texts on the current weights over the base
model's, which is read once, when the model is loaded and no edit is applied yet.

The drift guard (safety/drift.py) measures the same kind of ratio, but only when an edit is applied
and on groups of texts that rotate; after a revert it says nothing. This figure is what a person reads
in the app's header: one fixed set of texts, so two figures of the same session compare."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..safety.drift import reference_perplexity
from ..safety.reference import reference_texts

TEXTS = 4  # reference samples read (the guard reads 4 per group too)
MAX_TOKENS = 24  # tokens of each (the guard reads groups of 4 texts x 24 tokens too; cost: one forward pass)


class DriftMeter:
    """ratio(model) = perplexity of the texts now / the base model's (1.0: unchanged)."""

    def __init__(self, base_model: nn.Module, tokenizer: Any, texts: int = TEXTS, max_tokens: int = MAX_TOKENS):
        self.tokenizer = tokenizer
        self.texts = list(reference_texts("samples")[:texts])
        self.max_tokens = max_tokens
        self.base_perplexity = self.perplexity(base_model)  # the caller gives the model before any edit

    def perplexity(self, model: nn.Module) -> float:
        return reference_perplexity(model, self.tokenizer, self.texts, max_tokens=self.max_tokens)

    def ratio(self, model: nn.Module) -> float:
        return self.perplexity(model) / self.base_perplexity

    def describe(self) -> str:
        """What is measured, in words."""
        return (f"perplexity of {len(self.texts)} reference texts ({self.max_tokens} tokens each) "
                "over the base model's")
