"""The LoRA editor: a HuggingFace `peft` LoRA adapter on the chosen MLP matrices, trained on the new
targets, then folded into rank-r factors `left @ right = B·A·scale` in the parameter's own layout.

The adapter is injected for the duration of `compute` and unloaded in a `finally`, which puts the
original modules (and their untouched weights) back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta, ParamDelta
from ..core.methods import MethodSpec
from ..core.request import TokenizedRequest
from ..core.settable import LAYERS, SEED, Choices, Flag, Integer, Nested, Number, Settable
from ..core.training import Progress, seeded
from ..model.contexts import ContextPrefixes, PrefixConfig
from ..model.hooks import frozen
from ..model.specs import mlp_param_names, weight_layout
from ..safety.keys import module_inputs
from ..safety.preserve import KeyPreserver, PreserveConfig, preserve_field
from ..scoring.batches import TrainingBatch, batch_target_logits, loss_positions, training_batch
from .training import ANCHORS, above_trained_blocks, check_anchor, optimize, through_anchor

ADAPTER = "factedit"


@dataclass(frozen=True)
class LoRAEditConfig:
    # Defaults tuned on the default model with CounterFact train[:20] (bench/bench_editing.py --split
    # train): block 8 as for ft; smaller steps keep neighbours (lr 5e-3: NS 0.60, 2e-3: 0.65, 1e-3: 0.70).
    # The matrix was chosen on val[:100]: at ES 0.98-1.00 the down projection kept NS 0.56, the up
    # projection 0.62, the gate projection 0.65 ("act" is the gate on gated MLPs, the up projection else).
    # On val[100:200], not used for the choice, gate and down were close: NS 0.58 vs 0.57 (unedited 0.70).
    # Preservation (chosen on val[200:240], unedited NS 0.775): without it ES 0.975 / NS 0.70, and 40
    # edits one after another raised the reference perplexity 1.20× (ES of those 40 fell to 0.825).
    # Inside the null space an edit needs larger steps: threshold 0.5 at lr 1e-3 / 60 steps reached ES
    # 0.875 (NS 0.75, 40 accumulated: 1.014×); lr 3e-3 / 80 steps ES 1.0 / NS 0.70 (1.035×), and the
    # smaller null space of threshold 0.3 ES 1.0 / NS 0.725.
    layers: tuple[int, ...] = (8,)  # transformer blocks to edit; negative counts from the end
    matrices: tuple[str, ...] = ("act",)  # MLP roles: "in", "gate" (gated MLPs), "out", "act" (alias)
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA scale = alpha / rank
    lr: float = 3e-3  # Adam learning rate (of the A factors and, times `b_lr_ratio`, of the B factors)
    # LoRA+ (Hayou et al. 2024; peft's create_loraplus_optimizer), at the ratio the paper recommends for
    # language models (2^4): B starts at zero, so a faster B makes the product B·A grow in fewer steps.
    # CounterFact val[600:700], one edit at a time: ES / PS / NS 1.00 / 0.65 / 0.60 at 3.8x a
    # forward+backward pass, against 1.00 / 0.65 / 0.59 at 10.2x with plain LoRA (ratio 1); 40 kept edits
    # reach more facts (retention 0.775 vs 0.70) but drift more (1.12x vs 1.05x after 40; docs/measured.md, "LoRA+").
    b_lr_ratio: float = 16.0  # B's learning rate over A's (LoRA+); 1 = plain LoRA
    # How the A factors start: "random" (peft's Kaiming init) or "keys": the edit's own inputs to the
    # matrix, their top right singular vectors (in the null space with preservation), the rest random.
    # With b_lr_ratio=16, "keys" edits at about 3x a forward+backward pass (plain LoRA 10x) with ES as plain
    # LoRA's, PS/NS within 0.02 on val[600:650] but 0.08/0.04 lower on val[650:700], and kept edits drift
    # more (docs/measured.md, "LoRA from the edit's keys").
    init: str = "random"
    max_steps: int = 80  # cap on optimisation steps (early stop when every target token is argmax)
    seed: int | None = 0  # LoRA's A matrices start random; this makes edits reproducible
    # Keep the change in the null space of the reference corpus's keys (preserve.py: the A factors,
    # the input side, are projected at every step); None = off.
    preserve: PreserveConfig | None = preserve_field(PreserveConfig(threshold=0.3))
    # Train on the prompt alone and under each of these short model-written prefixes (contexts.py,
    # MEMIT's context templates): the loss averages the target NLL over them. None = the prompt alone.
    prefixes: PrefixConfig | None = field(default=None, metadata={"dataclass": PrefixConfig})
    # Also train on the prompt asked through the chat template, the target as the reply's start
    # (scoring/batches.py); nothing without a chat template. The stop check reads the prompt alone.
    chat_context: bool = False
    # Where the loss reaches the edited blocks: "all" positions or the "subject"'s last token only
    # (subject-anchored fine-tuning, as for ft / ft_l: peft/training.py `through_anchor`).
    anchor: str = "all"

    # What the app and the service may set per edit (settable.py): rank bounds memory, steps time.
    SETTABLE: ClassVar[Settable] = {
        "layers": LAYERS, "matrices": Choices("in", "gate", "out", "act"), "rank": Integer(1, 64),
        "alpha": Number(1e-3, 1e3), "lr": Number(1e-6, 0.1), "b_lr_ratio": Number(1.0, 64.0),
        "init": Choices("random", "keys"),
        "max_steps": Integer(1, 200), "seed": SEED,
        "preserve": Nested(PreserveConfig.SETTABLE), "prefixes": Nested(PrefixConfig.SETTABLE),
        "chat_context": Flag(), "anchor": Choices(*ANCHORS),
    }

    def __post_init__(self) -> None:
        check_anchor(self.anchor)
        finite = float("inf")
        if self.rank < 1 or self.max_steps < 1 or not (0 < self.alpha < finite) or not (0 < self.lr < finite):
            raise ValueError("rank and max_steps must be >= 1, alpha and lr finite numbers > 0")
        if not 1 <= self.b_lr_ratio < finite:
            raise ValueError("b_lr_ratio must be a finite number >= 1")
        if self.init not in ("random", "keys"):
            raise ValueError(f"init must be 'random' or 'keys', not {self.init!r}")
        if not self.layers or not self.matrices:
            raise ValueError("layers and matrices must not be empty")


class LoRAEdit:
    def __init__(self, config: LoRAEditConfig) -> None:
        self.config = config
        self.prefixes = ContextPrefixes.of(config.prefixes)

    def param_names(self, model: nn.Module) -> list[str]:
        return mlp_param_names(model, self.config.layers, self.config.matrices)

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        preserver: KeyPreserver | None = None, progress: Progress | None = None,
    ) -> Delta:
        cfg = self.config
        modules = [name.removesuffix(".weight") for name in self.param_names(model)]
        layouts = {m: weight_layout(model, f"{m}.weight") for m in modules}
        lora_config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=modules, bias="none",
            fan_in_fan_out=any(layout == "in_out" for layout in layouts.values()),
        )
        # before the adapter goes in
        batch = training_batch(model, tokenizer, requests, self.prefixes, chat=cfg.chat_context,
                               anchored=cfg.anchor == "subject")
        keys = target_keys(model, modules, batch) if cfg.init == "keys" else None
        with frozen(model), seeded(cfg.seed):
            peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER)
            try:
                lora_layers = {m: peft_model.base_model.model.get_submodule(m) for m in modules}

                def forward(b: TrainingBatch) -> torch.Tensor:
                    return batch_target_logits(peft_model, b)  # (M, V)

                def project_inputs() -> None:  # A (r, in) rows into the null space of preserved keys
                    for m, layer in lora_layers.items():
                        a = layer.lora_A[ADAPTER].weight
                        a.copy_(preserver.project_rows(f"{m}.weight", a))

                if keys is not None:
                    with torch.no_grad():
                        for m, layer in lora_layers.items():
                            start_from_keys(layer.lora_A[ADAPTER].weight, keys[m], preserver, f"{m}.weight")
                if preserver is not None:
                    with torch.no_grad():
                        project_inputs()
                optimizer = create_loraplus_optimizer(peft_model, torch.optim.Adam, lr=cfg.lr,
                                                      loraplus_lr_ratio=cfg.b_lr_ratio)
                with above_trained_blocks(model, modules, batch), through_anchor(model, modules, batch):
                    optimize(forward, batch, optimizer, max_steps=cfg.max_steps,
                             after_step=project_inputs if preserver is not None else None, progress=progress)
                factors = {m: _fold(layer, layouts[m]) for m, layer in lora_layers.items()}
            finally:
                peft_model.unload()  # puts the original modules back; their weights were never written
        return Delta({f"{m}.weight": factors[m] for m in modules})


def target_keys(model: nn.Module, modules: Sequence[str], batch: TrainingBatch) -> dict[str, torch.Tensor]:
    """module -> its inputs (N, in) at the positions that predict a target token."""
    predicts = loss_positions(batch.labels)  # (B, T)
    inputs = module_inputs(model, modules, batch.input_ids, batch.attention_mask)  # module -> (B, T, in)
    return {m: inputs[m][predicts] for m in modules}


def start_from_keys(a: torch.Tensor, keys: torch.Tensor, preserver: KeyPreserver | None, name: str) -> None:
    """A (r, in)'s first rows become the top right singular vectors of `keys` (N, in) (their null-space
    part with preservation); the rest keep their random start."""
    if preserver is not None:
        keys = preserver.project_rows(name, keys)
    _, s, vh = torch.linalg.svd(keys.float(), full_matrices=False)  # vh (k, in)
    k = min(a.shape[0], int((s > s[0] * 1e-3).sum()))
    a[:k] = vh[:k].to(a.dtype)


def _fold(layer: nn.Module, layout: str) -> ParamDelta:
    """The adapter's change, B·s @ A, as factors in the weight's layout."""
    a = layer.lora_A[ADAPTER].weight.detach()  # (r, in)
    b = layer.lora_B[ADAPTER].weight.detach() * layer.scaling[ADAPTER]  # (out, r)
    return ParamDelta.from_lora(a, b, layout)


METHOD = MethodSpec("lora", LoRAEditConfig, LoRAEdit)
