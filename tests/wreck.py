"""A registered test method that breaks a model on purpose: a large random change of the output
embeddings (finite, so only the drift guard or the evaluation's drift figure can catch it). A tiny
random model's final norm and small head keep it near uniform whatever its MLPs do; its head is what
moves its perplexity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from factedit.core.delta import Delta, ParamDelta
from factedit.core.methods import MethodSpec, register_method
from factedit.core.settable import Number, Settable

WRECK = "test_wreck"


@dataclass(frozen=True)
class WreckConfig:
    scale: float = 1.0

    SETTABLE: ClassVar[Settable] = {"scale": Number(0.0, 100.0)}


class Wreck:
    def __init__(self, config: WreckConfig) -> None:
        self.config = config

    def compute(self, model, tokenizer, requests) -> Delta:
        head = model.get_output_embeddings().weight
        name = next(n for n, p in model.named_parameters() if p is head)
        shape = head.shape
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        return Delta({name: ParamDelta(dense=noise * self.config.scale)})


register_method(MethodSpec(WRECK, WreckConfig, Wreck))
