"""`adapter`: a Houlsby bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for
NLP") after one block's MLP, trained on the edit.

The MLP's output y becomes y + up(act(down·y + b_down)) + b_up, with down (r, d), up (d, r). `up` and
`b_up` start at zero, so the adapter starts as the identity; Adam trains all four on the target's NLL.
It acts at every position, so unlike `grace` and `tpatcher` it can reach paraphrases, and it can also
move unrelated prompts. A locality term holds it back there: `locality` × the mean squared change it makes
to the MLP output at the tokens of `locality_texts` unrelated true statements (the shipped reference text),
over the mean squared output there. It needs no forward pass of its own: the statements' MLP outputs are
read once per model.
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
from ..core.settable import SEED, Choices, Integer, Number, Settable
from ..core.side import SideModule
from ..core.training import Progress, seeded
from ..safety.reference import reference_texts
from .training import SideModuleEditor, locality_loss, module_hook, train_module


@dataclass(frozen=True)
class AdapterConfig:
    layer: int = -12  # the block whose MLP output the adapter follows; negative counts from the end
    rank: int = 8  # bottleneck width r
    act: str = "relu"  # the bottleneck's activation: relu, gelu or silu
    init_scale: float = 1.0  # std of `down` at start, times 1/sqrt(d)
    lr: float = 1e-2  # Adam learning rate
    max_steps: int = 60  # cap on optimisation steps
    stop_nll: float = 0.1  # stop once every target token is the argmax and the target NLL is below this
    locality: float = 1000.0  # weight of the change at unrelated tokens (module docstring); 0 turns it off
    locality_texts: int = 32  # how many reference statements those tokens come from
    seed: int | None = 0  # fixes the initialisation; None leaves torch's RNG as it is

    SETTABLE: ClassVar[Settable] = {
        "layer": Integer(-64, 63), "rank": Integer(1, 256), "act": Choices("relu", "gelu", "silu"),
        "init_scale": Number(1e-4, 10.0), "lr": Number(1e-5, 1.0), "max_steps": Integer(1, 500),
        "stop_nll": Number(1e-4, 5.0), "locality": Number(0.0, 1e4), "locality_texts": Integer(1, 2000),
        "seed": SEED,
    }

    def __post_init__(self) -> None:
        if self.rank < 1 or self.act not in ("relu", "gelu", "silu") or not (0 < self.lr < float("inf")):
            raise ValueError("rank must be >= 1, act relu/gelu/silu and lr a finite number > 0")
        if not (0 <= self.locality < float("inf")) or self.locality_texts < 1:
            raise ValueError("locality must be a finite number >= 0 and locality_texts >= 1")


class Adapter(SideModuleEditor):
    """Train one bottleneck adapter on the requests (module docstring)."""

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        data = self.point_data(model, tokenizer, requests)
        d = data.x.shape[-1]
        with seeded(cfg.seed):
            tensors = {"down": torch.randn(cfg.rank, d) * (cfg.init_scale / d**0.5), "b_down": torch.zeros(cfg.rank),
                       "up": torch.zeros(d, cfg.rank), "b_up": torch.zeros(d)}

            def module(ts: Mapping[str, torch.Tensor]) -> SideModule:
                return SideModule("bottleneck", data.point, ts, {"act": cfg.act})

            extra = None
            if cfg.locality > 0:
                texts = reference_texts("statements")[: cfg.locality_texts]
                extra = locality_loss(module, *self.unrelated_points(model, tokenizer, texts, data.point), cfg.locality)
            train_module(model, data, module_hook(module), tensors, lr=cfg.lr, max_steps=cfg.max_steps,
                         stop_nll=cfg.stop_nll, extra_loss=extra, progress=progress)
        return Delta({}, {"adapter": module({k: v.detach() for k, v in tensors.items()})})


# Guarded: it acts at every token of every input, and kept adapters compound (10 kept moved the reference
# perplexity 4.7e6x unguarded, docs/evaluation.md).
METHOD = MethodSpec("adapter", AdapterConfig, Adapter, guarded=True,
                    description="Houlsby bottleneck adapter after one MLP, identity at start, trained on the edit")
