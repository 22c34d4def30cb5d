"""`ia3`: (IA)³ scaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning") on the MLP's intermediate activation, trained on the edit and folded
into the weights.

Scaling the intermediate activation h (the input of the MLP's down projection W_out) by a vector l is the
same as scaling W_out's input columns: W_out (l ⊙ h) = (W_out diag(l)) h. So the edit is a plain dense
delta Δ = W_out diag(l) − W_out on W_out (in its own layout), applied as `W += Δ`, exported and reverted
like any other. The attention k/v scalings of the paper are not edited here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta, ParamDelta
from ..core.methods import MethodSpec
from ..core.request import TokenizedRequest
from ..core.settable import LAYERS, SEED, Integer, Number, Settable
from ..core.training import Progress, seeded
from ..model.hooks import frozen
from ..model.specs import mlp_param_names, weight_layout
from ..scoring.batches import make_batch
from ..scoring.sequences import pad_id_of
from .training import optimize


@dataclass(frozen=True)
class IA3Config:
    layers: tuple[int, ...] = (6, 7, 8, 9, 10)  # blocks whose intermediate activation is scaled
    lr: float = 0.05  # Adam learning rate for the scales (which start at 1)
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


def scaled(weight: torch.Tensor, scale: torch.Tensor, layout: str) -> torch.Tensor:
    """W_out diag(l): the down projection's input dimension scaled, in the weight's own layout
    ((d, inter) for nn.Linear, (inter, d) for GPT-2's Conv1D)."""
    return weight * (scale[None, :] if layout == "out_in" else scale[:, None])


class IA3:
    """Train scaling vectors on the requests and fold them into a dense delta (module docstring)."""

    def __init__(self, config: IA3Config) -> None:
        self.config = config

    def param_names(self, model: nn.Module) -> list[str]:
        return mlp_param_names(model, self.config.layers, ("out",))

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        names = self.param_names(model)
        params = dict(model.named_parameters())
        layouts = {n: weight_layout(model, n) for n in names}
        originals = {n: params[n].detach().float() for n in names}
        inter = {n: w.shape[1] if layouts[n] == "out_in" else w.shape[0] for n, w in originals.items()}
        scales = {n: torch.ones(inter[n]) for n in names}  # (inter,) each
        batch = make_batch(requests, pad_id_of(tokenizer), next(model.parameters()).device)

        def forward() -> torch.Tensor:
            weights = {n: scaled(originals[n], scales[n], layouts[n]).to(params[n].dtype) for n in names}
            kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            return functional_call(model, weights, args=(), kwargs=kwargs).logits

        with frozen(model), seeded(cfg.seed):
            optimize(forward, batch.labels, scales, lr=cfg.lr, max_steps=cfg.max_steps, stop_nll=cfg.stop_nll,
                     progress=progress)
        return Delta({n: ParamDelta(dense=scaled(originals[n], scales[n], layouts[n]) - originals[n]) for n in names})


METHOD = MethodSpec("ia3", IA3Config, IA3, description="(IA)³: scaling vectors on the MLP's intermediate "
                    "activation, trained on the edit, folded exactly into the down projection (W += Δ)")
