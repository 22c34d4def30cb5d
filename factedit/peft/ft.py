"""Fine-tuning editors: `ft` (plain) and `ft_l` (constrained, Zhu et al. 2020; the FT+L baseline of
the ROME paper).

Both train copies of the chosen MLP matrices on the new targets through `torch.func.functional_call`,
so the model's own weights are never written, and return `trained - original` as a dense delta.
`ft_l` keeps every weight within an L∞ ball of radius `norm_constraint` around its original value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta, ParamDelta
from ..core.methods import MethodSpec
from ..core.request import TokenizedRequest
from ..core.settable import LAYERS, SEED, Choices, Flag, Integer, Nested, Number, Settable
from ..core.training import Progress, seeded
from ..model.contexts import ContextPrefixes, PrefixConfig
from ..model.hooks import frozen
from ..model.specs import mlp_param_names
from ..safety.preserve import KeyPreserver, PreserveConfig, preserve_field
from ..scoring.batches import TrainingBatch, batch_target_logits, training_batch
from .training import ANCHORS, above_trained_blocks, check_anchor, optimize, through_anchor


@dataclass(frozen=True)
class FTConfig:
    # Defaults tuned on the default model with CounterFact train[:20] (bench/bench_editing.py --split
    # train): an early-middle block keeps neighbouring facts best (block 8: NS 0.70 vs 0.60 at 26).
    layers: tuple[int, ...] = (8,)  # transformer blocks to edit; negative counts from the end
    matrices: tuple[str, ...] = ("out",)  # MLP roles to train: "in", "gate" (gated MLPs), "out"
    lr: float = 5e-4  # Adam learning rate
    max_steps: int = 25  # cap on optimisation steps (early stop when every target token is argmax)
    norm_constraint: float | None = None  # L∞ radius around the original weights; None = off
    seed: int | None = 0  # fixes any randomness; None leaves torch's RNG as it is
    # Keep the change in the null space of the reference corpus's keys (preserve.py); None = off.
    preserve: PreserveConfig | None = preserve_field(None)
    # Train on the prompt alone and under each of these short model-written prefixes (contexts.py,
    # MEMIT's context templates): the loss averages the target NLL over them. None = the prompt alone.
    prefixes: PrefixConfig | None = field(default=None, metadata={"dataclass": PrefixConfig})
    # Also train on the prompt asked through the chat template, the target as the reply's start
    # (scoring/batches.py); nothing without a chat template. The stop check reads the prompt alone.
    chat_context: bool = False
    # Where the loss reaches the edited blocks: "all" positions, or only the "subject"'s last token
    # (subject-anchored fine-tuning, peft/training.py `through_anchor`; the subject is the request's,
    # else the one found in the prompt). With `prefixes` it reaches paraphrases (docs/measured.md, "Subject-anchored").
    anchor: str = "all"

    # What the app and the service may set per edit (settable.py): steps bound the time an edit
    # holds the weights.
    SETTABLE: ClassVar[Settable] = {
        "layers": LAYERS, "matrices": Choices("in", "gate", "out"), "lr": Number(1e-6, 0.1),
        "max_steps": Integer(1, 200), "norm_constraint": Number(1e-5, 1.0, optional=True), "seed": SEED,
        "preserve": Nested(PreserveConfig.SETTABLE), "prefixes": Nested(PrefixConfig.SETTABLE),
        "chat_context": Flag(), "anchor": Choices(*ANCHORS),
    }

    def __post_init__(self) -> None:
        check_anchor(self.anchor)
        if not (0 < self.lr < float("inf")) or self.max_steps < 1:
            raise ValueError("lr must be a finite number > 0 and max_steps >= 1")
        if self.norm_constraint is not None and not (0 < self.norm_constraint < float("inf")):
            raise ValueError("norm_constraint must be > 0, or None to turn it off")
        if not self.layers or not self.matrices:
            raise ValueError("layers and matrices must not be empty")


@dataclass(frozen=True)
class FTLConfig(FTConfig):
    """FT with the L∞ constraint on by default, and the change kept in the null space of the
    reference corpus's keys (preserve.py), so that edits can accumulate.

    Without preservation (tuned on CounterFact val[:100]) the up and down projections at radius 3e-3
    gave ES 0.98 / NS 0.66 one edit at a time, but 40 edits one after another raised the reference
    perplexity 1.13× (val[200:240]). Inside the null space an edit needs a larger change: at radius
    1e-2, lr 2e-3 and 60 steps it keeps ES 0.975 / NS 0.75 (unedited 0.775) on val[200:240] and 40
    accumulated edits move the perplexity 1.008× (threshold 1.0 at radius 5e-3: ES 0.95, 1.005×).

    lr 5e-3 (Adam's first steps are about lr per weight, so two reach the radius): half the steps at the
    same quality. val[600:700], one edit at a time: ES 1.00 / PS 0.63 / NS 0.61 both, 2.9-3.1× a
    forward+backward pass against 5.1-5.4× at 2e-3; 40 kept edits on val[200:240]: ES 0.975 (0.95),
    PS 0.50 (0.50), NS 0.75 (0.75), retention 0.90 (0.85), perplexity 1.010× (1.008×)."""

    matrices: tuple[str, ...] = ("in", "out")
    lr: float = 5e-3
    max_steps: int = 60
    norm_constraint: float | None = 1e-2
    preserve: PreserveConfig | None = preserve_field(PreserveConfig(threshold=0.5))


class FineTune:
    """Compute a dense delta by fine-tuning the chosen MLP matrices (see module docstring)."""

    def __init__(self, config: FTConfig) -> None:
        self.config = config
        self.prefixes = ContextPrefixes.of(config.prefixes)

    def param_names(self, model: nn.Module) -> list[str]:
        return mlp_param_names(model, self.config.layers, self.config.matrices)

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        preserver: KeyPreserver | None = None, progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        names = self.param_names(model)
        params = dict(model.named_parameters())
        dtypes = {n: params[n].dtype for n in names}
        # Float32 master copies (no copy for a float32 model): Adam's eps (1e-8) is 0 in float16, and
        # its steps would be rounded away or turn to NaN on float16 weights.
        originals = {n: params[n].detach().float() for n in names}
        trained = {n: w.clone().requires_grad_(True) for n, w in originals.items()}
        batch = training_batch(model, tokenizer, requests, self.prefixes, chat=cfg.chat_context,
                               anchored=cfg.anchor == "subject")

        def forward(b: TrainingBatch) -> torch.Tensor:
            weights = {n: w.to(dtypes[n]) for n, w in trained.items()}  # the model's dtype; grads reach w
            return batch_target_logits(model, b, weights)  # (M, V)

        def constrain() -> None:
            for n, w in trained.items():
                if cfg.norm_constraint is not None:  # back into the L∞ ball around the original weights
                    radius = cfg.norm_constraint
                    w.copy_(torch.clamp(w, originals[n] - radius, originals[n] + radius))
                if preserver is not None:  # the change back into the null space of preserved keys
                    w.copy_(originals[n] + preserver.project_tensor(n, w - originals[n]))

        with frozen(model), seeded(cfg.seed), above_trained_blocks(model, names, batch), \
                through_anchor(model, names, batch):
            optimize(
                forward, batch, torch.optim.Adam(trained.values(), lr=cfg.lr), max_steps=cfg.max_steps,
                after_step=constrain if cfg.norm_constraint is not None or preserver is not None else None,
                progress=progress,
            )
        return Delta({n: ParamDelta(dense=(trained[n].detach() - originals[n])) for n in names})


METHOD = MethodSpec("ft", FTConfig, FineTune)
METHOD_L = MethodSpec("ft_l", FTLConfig, FineTune)
