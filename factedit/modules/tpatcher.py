"""`tpatcher`: gated neurons added to a late MLP per fact (T-Patcher, Huang et al. 2023, "Transformer-Patcher:
One Mistake worth One Neuron").

Each edit adds one neuron per key position (training.py: the last prompt token and each target token but
the last) to block `layer`'s MLP: a = relu(x·w_in + b_in) on the MLP's input x, and the MLP's output
gains a·w_out. A neuron starts aimed at its key (w_in = key / ‖key‖², b_in = init_act − 1, so a = init_act
there and 0 for inputs whose projection on the key is below 1 − init_act of it) and is trained on the
target's NLL plus T-Patcher's two margins: its key keeps a pre-activation of at least `key_margin`, and
the inputs of other tokens (the edit's own, and `memory` reference statements and samples) stay below
−`memory_margin`, so that it fires on the edit's key only.
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
from ..safety.reference import reference_texts
from .training import Progress, module_hook, point_data, point_of, seeded, text_inputs, train_module


@dataclass(frozen=True)
class TPatcherConfig:
    layer: int = -4  # the block whose MLP gets the neurons; negative counts from the end
    init_act: float = 0.2  # the neuron's activation at its key when it starts
    lr: float = 0.05  # Adam learning rate (w_out, b_in, and w_in's shift in the input's units)
    max_steps: int = 60  # cap on optimisation steps
    stop_nll: float = 0.1  # stop once every target token is the argmax and the target NLL is below this
    key_margin: float = 0.1  # the key's pre-activation is kept at least this
    memory_margin: float = 0.1  # other inputs' pre-activations are kept at most minus this
    memory: int = 48  # reference texts (statements, then samples) whose tokens must not fire the neuron
    memory_weight: float = 1.0  # weight of the two margin losses
    seed: int | None = 0  # fixes any randomness; None leaves torch's RNG as it is

    SETTABLE: ClassVar[Settable] = {
        "layer": Integer(-64, 63), "init_act": Number(1e-3, 1.0), "lr": Number(1e-5, 1.0),
        "max_steps": Integer(1, 500), "stop_nll": Number(1e-4, 5.0), "key_margin": Number(0.0, 10.0),
        "memory_margin": Number(0.0, 10.0), "memory": Integer(0, 256), "memory_weight": Number(0.0, 100.0),
        "seed": SEED,
    }

    def __post_init__(self) -> None:
        if not (0 < self.init_act <= 1) or not (0 < self.lr < float("inf")) or self.max_steps < 1:
            raise ValueError("init_act must be in (0, 1], lr a finite number > 0 and max_steps >= 1")


def memory_texts(count: int) -> list[str]:
    """The reference texts whose tokens a neuron must not fire on: half statements, half samples."""
    statements, samples = reference_texts("statements"), reference_texts("samples")
    return statements[: count - count // 2] + samples[: count // 2]


class TPatcher:
    """Compute the neurons of the requests (module docstring)."""

    def __init__(self, config: TPatcherConfig) -> None:
        self.config = config

    def param_names(self, model: nn.Module) -> list[str]:
        return []  # no weight changes: the neurons are a side module

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        data = point_data(model, tokenizer, requests, point_of(model, cfg.layer))
        keys = data.key_inputs  # (n, d)
        scale = keys.pow(2).sum(-1, keepdim=True)  # (n, 1): ‖key‖²
        negatives = data.other_inputs  # (m, d)
        if cfg.memory:
            negatives = torch.cat([negatives, text_inputs(model, tokenizer, memory_texts(cfg.memory), data.point)])
        tensors = {"shift": torch.zeros_like(keys), "b_in": torch.full((len(keys),), cfg.init_act - 1.0),
                   "w_out": torch.zeros_like(keys)}

        def module(ts: Mapping[str, torch.Tensor]) -> SideModule:
            w_in = (keys + ts["shift"]) / scale  # (n, d)
            return SideModule("gated_neurons", data.point, {"w_in": w_in, "b_in": ts["b_in"], "w_out": ts["w_out"]})

        def margins(ts: Mapping[str, torch.Tensor]) -> torch.Tensor:
            w_in = (keys + ts["shift"]) / scale
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
