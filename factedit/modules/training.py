"""What the module-adding editors share: the batch and its key positions, the point's input and output
there, and an Adam loop that trains a side module's tensors through a temporary hook.

The key positions of a row are those that predict a target token: the last prompt token and every
target token but the last. A module that changes the point's output there changes what the model says.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.request import TokenizedRequest
from ..core.side import SideModule, run_modules
from ..core.training import Progress
from ..model.hooks import forward_hooks, frozen, stop_after
from ..model.specs import resolve_layers
from ..model.weights import side_points
from ..scoring.batches import IGNORE, TrainingBatch, batch_target_logits, make_batch, target_nll_at
from ..scoring.sequences import pad_id_of


@dataclass(frozen=True)
class PointData:
    """One batch at one point: the point's input x and output y (both (B, T, d), detached) and which
    positions are key positions (module docstring)."""

    batch: TrainingBatch
    point: str
    x: torch.Tensor  # (B, T, d)
    y: torch.Tensor  # (B, T, d)
    keys: torch.Tensor  # (B, T) bool

    @property
    def key_inputs(self) -> torch.Tensor:
        return self.x[self.keys]  # (n, d), row-major: request by request, position by position

    @property
    def other_inputs(self) -> torch.Tensor:
        """Inputs at real tokens that are not key positions: (m, d)."""
        return self.x[(self.batch.attention_mask.bool()) & ~self.keys]


class SideModuleEditor:
    """What the editors whose edit is one side module share: no weight changes, and the batch read at the
    point of their config's `layer` (the output of that block's MLP)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        # Unrelated texts' input and output at a point, for the model they were read from (a weak reference):
        # they only bound what a module may change, so the base model's serve every later edit.
        self._text_points: tuple[weakref.ref, str, tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] | None = None

    def unrelated_points(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                         point: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`text_points` of `texts` at `point`, read once per model, point and texts."""
        cached, key = self._text_points, tuple(texts)
        if cached is None or cached[0]() is not model or cached[1:3] != (point, key):
            self._text_points = cached = (weakref.ref(model), point, key, text_points(model, tokenizer, key, point))
        return cached[3]

    def param_names(self, model: nn.Module) -> list[str]:
        return []  # no weight changes: the edit is a side module

    def point_data(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   requests: Sequence[TokenizedRequest]) -> PointData:
        return point_data(model, tokenizer, requests, point_of(model, self.config.layer))


def point_of(model: nn.Module, layer: int) -> str:
    """The side-module point (a block's MLP) of `layer` (negative counts from the end)."""
    (index,) = resolve_layers(model, (layer,))
    return side_points(model)[index]


@torch.no_grad()
def point_data(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
               point: str) -> PointData:
    """Run the requests' batch (prompt + target) once and record the point's input and output."""
    device = next(model.parameters()).device
    batch = make_batch(requests, pad_id_of(tokenizer), device)
    x, y = read_point(model, point, batch.input_ids, batch.attention_mask)
    keys = torch.zeros_like(batch.labels, dtype=torch.bool)  # (B, T)
    keys[:, :-1] = batch.labels[:, 1:] != IGNORE
    return PointData(batch, point, x, y, keys)


@torch.no_grad()
def read_point(model: nn.Module, point: str, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point's input and output on a batch: two (B, T, d) float32 tensors, detached; the forward pass
    stops at the point (nothing above it is needed)."""
    seen: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["x"], seen["y"] = args[0].detach().float(), output.detach().float()

    with forward_hooks(model, hooks={point: record}), stop_after(model, point):
        model(input_ids=input_ids, attention_mask=attention_mask)
    return seen["x"], seen["y"]


@torch.no_grad()
def text_points(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                point: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The point's input and output at every real token of `texts`: two (m, d) float32 tensors (T-Patcher's
    negatives, the positions a module must leave alone)."""
    device = next(model.parameters()).device
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=48).to(device)
    x, y = read_point(model, point, enc["input_ids"], enc["attention_mask"])  # (B, T, d) each
    real = enc["attention_mask"].bool()
    return x[real], y[real]


def locality_loss(build: Callable[[Mapping[str, torch.Tensor]], SideModule], x: torch.Tensor, y: torch.Tensor,
                  weight: float) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """An `optimize` extra loss: `weight` × the mean squared change the module `build(tensors)` makes to the
    point's output at unrelated positions (x, y: (m, d), from `text_points`), over the mean squared output
    there. Zero for a module that leaves those positions alone, whatever it does at the edit's keys."""
    scale = y.pow(2).sum(-1).mean()  # () a fixed unit: the loss is scale-free across models and layers

    def loss(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        change = run_modules([build(tensors)], x, y) - y  # (m, d)
        return weight * change.pow(2).sum(-1).mean() / scale

    return loss


def optimize(
    forward: Callable[[], torch.Tensor],
    labels: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    *,
    lr: float,
    max_steps: int,
    stop_nll: float,
    extra_loss: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> int:
    """Adam on `tensors` (float32 leaves, trained in place) until every target token of `forward()`'s
    logits (M, V) at the target-predicting positions (`batch_target_logits`) is the argmax and the target
    NLL is below `stop_nll`, or after `max_steps` steps.
    Loss: target NLL + `extra_loss(tensors)`. Returns the steps taken."""
    for t in tensors.values():
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(list(tensors.values()), lr=lr)
    try:
        for step in range(max_steps + 1):
            nll, done = target_nll_at(forward(), labels)
            loss = nll + extra_loss(tensors) if extra_loss is not None else nll
            if progress is not None:
                progress(step, max_steps, float(loss.detach()))
            if (done and float(nll.detach()) < stop_nll) or step == max_steps:
                return step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for t in tensors.values():
            t.requires_grad_(False)
    return max_steps


Hook = Callable[[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def train_module(model: nn.Module, data: PointData, hook: Hook, tensors: dict[str, torch.Tensor],
                 **options: object) -> int:
    """`optimize` the tensors of a module that `hook(tensors, x, y)` runs at the point (the point's input
    x and output y, (B, T, d)) on the batch of `data`; `options` as `optimize` takes them."""
    return train_modules(model, data.batch, {data.point: hook}, tensors, **options)


def train_modules(model: nn.Module, batch: TrainingBatch, hooks: Mapping[str, Hook],
                  tensors: dict[str, torch.Tensor], **options: object) -> int:
    """`train_module` for modules at several points at once: `hooks` maps each point to its
    `hook(tensors, x, y)` (all see every tensor, in the model's dtype)."""
    dtype = next(model.parameters()).dtype

    def forward_hook(hook: Hook) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        return lambda module, args, output: hook({k: v.to(dtype) for k, v in tensors.items()}, args[0], output)

    with frozen(model), forward_hooks(model, hooks={p: forward_hook(h) for p, h in hooks.items()}):
        return optimize(lambda: batch_target_logits(model, batch),
                        batch.labels, tensors, **options)


def module_hook(build: Callable[[Mapping[str, torch.Tensor]], SideModule]):
    """A `train_module` hook that runs the side module `build(tensors)`."""
    return lambda tensors, x, y: run_modules([build(tensors)], x, y)
