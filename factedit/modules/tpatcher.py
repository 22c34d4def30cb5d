"""`tpatcher`: gated neurons added to a late MLP per fact (T-Patcher, Huang et al. 2023, "Transformer-Patcher:
One Mistake worth One Neuron").

Each edit adds one neuron per key position (training.py: the last prompt token and each target token but
the last) to block `layer`'s MLP: a = relu(x·w_in + b_in) on the MLP's input x, and the MLP's output
gains a·w_out. A neuron is aimed at its key: w_in = key / (width·‖key‖²) and b_in starts at 1 − 1/width,
so a = 1 at the key and 0 wherever the input's projection on the key is below 1 − width of the key's
length. `width` must be small: on the default model the MLP inputs of neighbouring prompts (same
relation, another subject) lie only 0.22 (relative) from the key, a cosine of about 0.976. Training moves
w_out (what the neuron writes) and b_in (where it fires) on the target's NLL plus T-Patcher's two
margins: its key keeps a pre-activation of at least `key_margin`, and the inputs of other tokens (the
edit's own, and `memory` reference statements and samples) stay below −`memory_margin`, so that it
fires on the edit's key only.
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
from ..safety.reference import reference_texts
from .training import SideModuleEditor, module_hook, train_module


@dataclass(frozen=True)
class TPatcherConfig:
    layer: int = -4  # the block whose MLP gets the neurons; negative counts from the end
    width: float = 0.01  # a neuron fires where the input's projection on its key exceeds 1 − width of it
    lr: float = 0.2  # Adam learning rate (w_out and b_in)
    max_steps: int = 60  # cap on optimisation steps
    stop_nll: float = 0.1  # stop once every target token is the argmax and the target NLL is below this
    key_margin: float = 0.5  # the key's pre-activation is kept at least this
    memory_margin: float = 0.1  # other inputs' pre-activations are kept at most minus this
    memory: int = 32  # reference texts (statements, then samples) whose tokens must not fire the neuron
    memory_weight: float = 1.0  # weight of the two margin losses
    seed: int | None = 0  # fixes any randomness; None leaves torch's RNG as it is

    SETTABLE: ClassVar[Settable] = {
        "layer": Integer(-64, 63), "width": Number(1e-5, 1.0), "lr": Number(1e-5, 1.0),
        "max_steps": Integer(1, 500), "stop_nll": Number(1e-4, 5.0), "key_margin": Number(0.0, 10.0),
        "memory_margin": Number(0.0, 10.0), "memory": Integer(0, 256), "memory_weight": Number(0.0, 100.0),
        "seed": SEED,
    }

    def __post_init__(self) -> None:
        if not (0 < self.width <= 1) or not (0 < self.lr < float("inf")) or self.max_steps < 1:
            raise ValueError("width must be in (0, 1], lr a finite number > 0 and max_steps >= 1")


def memory_texts(count: int) -> list[str]:
    """The reference texts whose tokens a neuron must not fire on: half statements, half samples."""
    statements, samples = reference_texts("statements"), reference_texts("samples")
    return statements[: count - count // 2] + samples[: count // 2]


class TPatcher(SideModuleEditor):
    """Compute the neurons of the requests (module docstring)."""

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        data = self.point_data(model, tokenizer, requests)
        keys = data.key_inputs  # (n, d)
        w_in = keys / (cfg.width * keys.pow(2).sum(-1, keepdim=True))  # (n, d): pre-activation 1/width at the key
        negatives = data.other_inputs  # (m, d)
        if cfg.memory:
            memory, _ = self.unrelated_points(model, tokenizer, memory_texts(cfg.memory), data.point)  # (k, d)
            negatives = torch.cat([negatives, memory])
        tensors = {"b_in": torch.full((len(keys),), 1.0 - 1.0 / cfg.width), "w_out": torch.zeros_like(keys)}

        def module(ts: Mapping[str, torch.Tensor]) -> SideModule:
            return SideModule("gated_neurons", data.point, {"w_in": w_in, "b_in": ts["b_in"], "w_out": ts["w_out"]})

        def margins(ts: Mapping[str, torch.Tensor]) -> torch.Tensor:
            on_key = (keys * w_in).sum(-1) + ts["b_in"]  # (n,)
            off_key = negatives @ w_in.T + ts["b_in"]  # (m, n)
            return cfg.memory_weight * (torch.relu(cfg.key_margin - on_key).mean()
                                        + torch.relu(off_key + cfg.memory_margin).mean())

        with seeded(cfg.seed):
            train_module(model, data, module_hook(module), tensors, lr=cfg.lr, max_steps=cfg.max_steps,
                         stop_nll=cfg.stop_nll, extra_loss=margins, progress=progress)
        return Delta({}, {"neurons": module({k: v.detach() for k, v in tensors.items()})})


METHOD = MethodSpec("tpatcher", TPatcherConfig, TPatcher, description="T-Patcher: gated neurons added to a late "
                    "MLP, one per key position of the fact, trained to fire on its key only")
