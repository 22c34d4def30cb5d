"""`bitfit`: BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models") on models that have no biases to tune.

BitFit trains only a model's bias terms. Llama-family models (the default) and Gemma have none in their
MLPs, so this editor ADDS one: a per-channel bias on the output of the MLP of each chosen block, y + b with
b (d,), starting at zero, trained on the target's NLL. It is a side module (core/side.py type `bias`),
not a weight change: on those models no parameter exists to fold it into, and it is kept a side module on
every architecture so that one edit means the same computation everywhere (on GPT-2, GPT-NeoX and GPT-J
the down projection has a bias it could be added to). A bias acts at every position of every prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta
from ..core.methods import MethodSpec
from ..core.request import TokenizedRequest
from ..core.settable import LAYERS, SEED, Integer, Number, Settable
from ..core.side import SideModule, run_modules
from ..core.training import Progress, seeded
from ..model.specs import resolve_layers
from ..model.weights import side_points
from ..scoring.batches import make_batch
from ..scoring.sequences import pad_id_of
from .training import train_modules


@dataclass(frozen=True)
class BitFitConfig:
    layers: tuple[int, ...] = (6, 7, 8, 9, 10)  # blocks whose MLP output gains a bias
    lr: float = 1e-2  # Adam learning rate for the biases (which start at 0)
    max_steps: int = 40  # cap on optimisation steps
    stop_nll: float = 0.5  # stop once every target token is the argmax and the target NLL is below this
    seed: int | None = 0  # fixes any randomness; None leaves torch's RNG as it is

    SETTABLE: ClassVar[Settable] = {
        "layers": LAYERS, "lr": Number(1e-5, 1.0), "max_steps": Integer(1, 500), "stop_nll": Number(1e-4, 5.0),
        "seed": SEED,
    }

    def __post_init__(self) -> None:
        if not self.layers or not (0 < self.lr < float("inf")) or self.max_steps < 1:
            raise ValueError("layers must not be empty, lr a finite number > 0 and max_steps >= 1")


class BitFit:
    """Train one bias per chosen block's MLP output on the requests (module docstring)."""

    def __init__(self, config: BitFitConfig) -> None:
        self.config = config

    def param_names(self, model: nn.Module) -> list[str]:
        return []  # no weight changes: the edit is side modules

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        points = side_points(model)
        chosen = {f"bias_{i}": points[i] for i in resolve_layers(model, cfg.layers)}  # module name -> point
        d = int(model.config.hidden_size)
        tensors = {name: torch.zeros(d) for name in chosen}  # (d,) each

        def module(name: str, ts: Mapping[str, torch.Tensor]) -> SideModule:
            return SideModule("bias", chosen[name], {"bias": ts[name]})

        def hook(name: str):
            return lambda ts, x, y: run_modules([module(name, ts)], x, y)

        batch = make_batch(requests, pad_id_of(tokenizer), next(model.parameters()).device)
        with seeded(cfg.seed):
            train_modules(model, batch, {chosen[n]: hook(n) for n in chosen}, tensors, lr=cfg.lr,
                          max_steps=cfg.max_steps, stop_nll=cfg.stop_nll, progress=progress)
        trained = {k: v.detach() for k, v in tensors.items()}
        return Delta({}, {name: module(name, trained) for name in chosen})


# Guarded: a bias shifts every token of every input (10 kept edits moved the reference perplexity 2.7x
# unguarded, docs/evaluation.md).
METHOD = MethodSpec("bitfit", BitFitConfig, BitFit, guarded=True,
                    description="BitFit on models without biases: a bias added to the MLP output of a few blocks "
                    "(a side module), trained on the edit")
