"""`grace`: a key-value codebook at one block's MLP (GRACE, Hartvigsen et al. 2023, "Aging with GRACE").

Each edit adds entries (key, value, deferral radius): the key is the MLP's input at a key position of
the edit (training.py: the last prompt token and each target token but the last), the value is a
replacement of the MLP's output there, trained so that the model says the target, and the radius is
`radius` times the key's norm. At run time a position whose MLP input lies within an entry's radius
gets that entry's value (the latest edit wins where several match); everything else is untouched, so
edits do not disturb other prompts, nor each other. Revert removes exactly that edit's entries.
Measured on the default model (layer 18 of 30, CounterFact train[:20]): the same prompt in another
batch is within 1e-6 of its key (relative), other prompts, paraphrases and neighbours at least 0.22 away;
so `radius` 0.1 keeps neighbours apart and, as GRACE is known for, does not reach paraphrases.
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
from ..core.settable import SEED, Integer, Number, Settable
from ..core.side import SideModule
from ..core.training import Progress, seeded
from .training import SideModuleEditor, train_module


@dataclass(frozen=True)
class GraceConfig:
    layer: int = -12  # the block whose MLP holds the codebook (18 of 30 on the default model); negative from the end
    radius: float = 0.1  # deferral radius of each entry, relative to its key's norm
    lr: float = 0.5  # Adam learning rate for the values
    max_steps: int = 60  # cap on optimisation steps
    stop_nll: float = 0.1  # stop once every target token is the argmax and the target NLL is below this
    seed: int | None = 0  # fixes any randomness; None leaves torch's RNG as it is

    SETTABLE: ClassVar[Settable] = {
        "layer": Integer(-64, 63), "radius": Number(1e-6, 1.0), "lr": Number(1e-4, 10.0),
        "max_steps": Integer(1, 500), "stop_nll": Number(1e-4, 5.0), "seed": SEED,
    }

    def __post_init__(self) -> None:
        if not (0 < self.radius < float("inf")) or not (0 < self.lr < float("inf")) or self.max_steps < 1:
            raise ValueError("radius and lr must be finite numbers > 0 and max_steps >= 1")


class Grace(SideModuleEditor):
    """Compute codebook entries for the requests (module docstring)."""

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        data = self.point_data(model, tokenizer, requests)
        keys = data.key_inputs  # (n, d)
        values = data.y[data.keys].clone()  # (n, d): start from the outputs they replace

        def replace(tensors: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = y.clone()  # (B, T, d)
            out[data.keys] = tensors["values"].to(y.dtype)
            return out

        with seeded(cfg.seed):
            train_module(model, data, replace, {"values": values}, lr=cfg.lr, max_steps=cfg.max_steps,
                         stop_nll=cfg.stop_nll, progress=progress)
        radii = cfg.radius * keys.norm(dim=-1)  # (n,)
        module = SideModule("codebook", data.point, {"keys": keys, "values": values.detach(), "radii": radii})
        return Delta({}, {"codebook": module})


METHOD = MethodSpec("grace", GraceConfig, Grace, description="GRACE: a key-value codebook at one MLP; each "
                    "edit adds entries with a deferral radius; exact locality, no paraphrases")
