"""`ia3`: (IA)³ scaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning") on the MLP's intermediate activation and, with `kv`, on the attention
keys and values of the same blocks, trained on the edit and folded into the weights.

Each vector folds exactly into one matrix (model/scalings.py): the MLP's into the down projection's input
columns, Δ = W_out·diag(l) − W_out; the keys' and values' into their projection's rows (on GPT-2 and
GPT-NeoX the k/v rows of the fused qkv matrix), Δ = diag(l)·W − W, and their bias entries, Δb = l⊙b − b.
So the edit is a plain dense delta, applied as `W += Δ`, reverted like any other, and exported as a PEFT
IA³ adapter (artifacts/peft_ia3.py) or through the truncated SVD as LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta, ParamDelta
from ..core.methods import MethodSpec
from ..core.request import TokenizedRequest
from ..core.settable import LAYERS, SEED, Flag, Integer, Number, Settable
from ..core.training import Progress, seeded
from ..model.hooks import frozen
from ..model.scalings import Scaling, ia3_scalings
from ..scoring.batches import batch_target_logits, make_batch
from ..scoring.sequences import pad_id_of
from .training import optimize


@dataclass(frozen=True)
class IA3Config:
    layers: tuple[int, ...] = (6, 7, 8, 9, 10)  # blocks whose intermediate activation is scaled
    kv: bool = False  # also scale the attention keys and values of those blocks (docs/side-modules.md)
    lr: float = 0.05  # Adam learning rate for the scales (which start at 1)
    max_steps: int = 40  # cap on optimisation steps
    stop_nll: float = 0.5  # stop once every target token is the argmax and the target NLL is below this
    seed: int | None = 0  # fixes any randomness; None leaves torch's RNG as it is

    SETTABLE: ClassVar[Settable] = {
        "layers": LAYERS, "kv": Flag(), "lr": Number(1e-5, 1.0), "max_steps": Integer(1, 500),
        "stop_nll": Number(1e-4, 5.0), "seed": SEED,
    }

    def __post_init__(self) -> None:
        if not self.layers or not (0 < self.lr < float("inf")) or self.max_steps < 1:
            raise ValueError("layers must not be empty, lr a finite number > 0 and max_steps >= 1")
        if not isinstance(self.kv, bool):
            raise ValueError(f"kv must be true or false, got {self.kv!r}")

    @property
    def targets(self) -> tuple[str, ...]:
        return ("mlp", "k", "v") if self.kv else ("mlp",)


def folded(scalings: Sequence[Scaling], originals: dict[str, torch.Tensor],
           scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every touched parameter with its vector folded in (float32, as `originals`)."""
    out: dict[str, torch.Tensor] = {}
    for s in scalings:
        out[s.weight] = s.fold(originals[s.weight], scales[s.module])
        if s.bias is not None:
            out[s.bias] = s.fold_bias(originals[s.bias], scales[s.module])
    return out


class IA3:
    """Train scaling vectors on the requests and fold them into a dense delta (module docstring)."""

    def __init__(self, config: IA3Config) -> None:
        self.config = config

    def scalings(self, model: nn.Module) -> list[Scaling]:
        return ia3_scalings(model, self.config.layers, self.config.targets)

    def param_names(self, model: nn.Module) -> list[str]:
        return [name for s in self.scalings(model) for name in s.param_names()]

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        scalings = self.scalings(model)
        params = dict(model.named_parameters())
        originals = {n: params[n].detach().float() for s in scalings for n in s.param_names()}
        scales = {s.module: torch.ones(s.size) for s in scalings}  # (size,) each, 1 = unchanged
        batch = make_batch(requests, pad_id_of(tokenizer), next(model.parameters()).device)

        def forward() -> torch.Tensor:
            weights = {n: t.to(params[n].dtype) for n, t in folded(scalings, originals, scales).items()}
            return batch_target_logits(model, batch, weights)  # (M, V)

        with frozen(model), seeded(cfg.seed):
            optimize(forward, batch.labels, scales, lr=cfg.lr, max_steps=cfg.max_steps, stop_nll=cfg.stop_nll,
                     progress=progress)
        final = folded(scalings, originals, {k: v.detach() for k, v in scales.items()})
        return Delta({n: ParamDelta(dense=t - originals[n]) for n, t in final.items()})


# Guarded: a scale acts at every token of every input (10 kept edits moved the reference perplexity 1.65x
# unguarded, docs/evaluation.md).
METHOD = MethodSpec("ia3", IA3Config, IA3, guarded=True, description="(IA)³: scaling vectors on the MLP's intermediate "
                    "activation (and, with kv, the attention keys and values), trained on the edit, folded "
                    "exactly into the weights (W += Δ)")
