"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation") trained on
facts, as a PEFT prefix adapter: NOT a factedit edit (docs/side-modules.md, "Editors that add a module", says why).

Prefix tuning gives every layer's attention a few trained virtual keys and values that every real token
attends to. That changes the attention's softmax itself (its normaliser grows by the prefix's scores),
so no hook on a module's output computes it: a hook would need each head's output before the output
projection and the softmax's normaliser, i.e. a second implementation of every architecture's attention
(rotary variants, grouped-query heads, Gemma's norms and soft-capping, sliding windows). PEFT instead
passes the prefix as `past_key_values`, which shifts the real tokens' positions and which the caller's
own cache handling (the session's batched generation) would have to know about. So prefix tuning is
offered as what it is in the ecosystem: an adapter folder that `PeftModel.from_pretrained(base, folder)`
loads; the model itself is left exactly as it was (weights, `requires_grad` flags, mode, no hooks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.request import EditRequest, tokenize_request
from ..core.training import seeded
from ..model.hooks import frozen
from ..scoring.batches import batch_target_logits, make_batch, target_nll_at
from ..scoring.sequences import pad_id_of
from .training import optimize


@dataclass(frozen=True)
class PrefixConfig:
    num_virtual_tokens: int = 8  # virtual key/value positions per layer
    lr: float = 1e-2  # Adam learning rate for the prefix
    max_steps: int = 60  # cap on optimisation steps
    stop_nll: float = 0.5  # stop once every target token is the argmax and the target NLL is below this
    seed: int | None = 0  # fixes the prefix's random initialisation

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1 or not (0 < self.lr < float("inf")) or self.max_steps < 1:
            raise ValueError("num_virtual_tokens and max_steps must be >= 1 and lr a finite number > 0")


@dataclass(frozen=True)
class PrefixAdapter:
    """What `train_prefix_adapter` wrote and how training ended."""

    path: Path
    steps: int  # optimisation steps taken
    num_virtual_tokens: int
    nll: float  # the targets' mean NLL under the trained prefix


def train_prefix_adapter(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                         path: str | os.PathLike, config: PrefixConfig = PrefixConfig()) -> PrefixAdapter:
    """Train a PEFT prefix on the requests' targets (NLL) and save it to `path` (a new or empty folder).
    `model` is unchanged on return (module docstring); load the result with PeftModel.from_pretrained."""
    from peft import PrefixTuningConfig, get_peft_model

    from ..artifacts.adapters import empty_folder

    out = empty_folder(path)
    tokenized = [tokenize_request(r, tokenizer, None) for r in requests]
    batch = make_batch(tokenized, pad_id_of(tokenizer), next(model.parameters()).device)
    with frozen(model), seeded(config.seed):
        peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens)
        wrapped = get_peft_model(model, peft_config)  # wraps the model; adds no module and no hook to it
        prefix = wrapped.prompt_encoder["default"].embedding.weight  # (n_virtual, layers · 2 · kv width)

        def forward() -> torch.Tensor:
            return batch_target_logits(wrapped, batch)  # (M, V)

        steps = optimize(forward, batch.labels, {"prefix": prefix}, lr=config.lr, max_steps=config.max_steps,
                         stop_nll=config.stop_nll)
        with torch.no_grad():
            final = float(target_nll_at(forward(), batch.labels)[0])
        wrapped.save_pretrained(str(out))
    return PrefixAdapter(out, steps, config.num_virtual_tokens, final)
