"""What the model does with prompts: next-token distributions, the top-5 next tokens and greedy
continuations, on the model's own weights or with some replaced (functional_call). No locking or caching
here: the session calls these with the weights held and caches what belongs to the current weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from transformers import PreTrainedTokenizerBase

from ..editing.preview import prompt_items, score_prompts
from ..model.views import FunctionalModel
from ..scoring.sequences import top_tokens


@dataclass(frozen=True)
class Prediction:
    """What the model does with one prompt now: top-5 next tokens and a greedy continuation."""

    prompt: str
    top: list[dict[str, Any]]  # [{"token", "id", "prob"}] x 5
    continuation: str


def next_token_logprobs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
) -> list[torch.Tensor]:
    """The next-token log-distribution after each of `prompts` (repeats scored once), in one pass."""
    return [logprobs for logprobs, _ in score_prompts(model, tokenizer, prompt_items((), prompts))] if prompts else []


def top_next_tokens(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str,
    replaced: Mapping[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """The top-5 next tokens of `prompt`; `replaced`: parameter values to use instead of the model's."""
    scored_model = model if replaced is None else FunctionalModel(model, dict(replaced))
    return top_tokens(tokenizer, next_token_logprobs(scored_model, tokenizer, [prompt])[0], 5)


def continuation(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: int,
    replaced: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """The greedy continuation of `prompt`, `tokens` long; `replaced` as for `top_next_tokens`."""
    encoded = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {**encoded, "do_sample": False, "max_new_tokens": tokens, "pad_token_id": pad}
    with torch.no_grad():
        if replaced is None:
            out = model.generate(**kwargs)
        else:
            values = {f"model.{name}": value for name, value in replaced.items()}
            out = functional_call(_Generating(model), values, args=(), kwargs=kwargs, strict=False)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


class _Generating(nn.Module):
    """`model.generate` as a forward, so functional_call can run it with some weights replaced."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**kwargs)
