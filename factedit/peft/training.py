"""The optimisation loop shared by the fine-tuning editors: an optimizer (Adam) on the trained tensors
until every target token is the argmax (checked on the same forward pass, before stepping), or after
`max_steps` steps. The batches and their loss are the core's (scoring/batches.py).

Subject-anchored training (`through_anchor`): the loss reaches the trained matrices only through their
blocks' MLP output at each row's anchor, the subject's last token. The forward pass is unchanged (every
position computes with the trained weights), so the stop check sees the edit as it will be applied; what
changes is what the gradient asks for: a new value of the subject's representation, which every later
position and every wording that names the subject reads, instead of a shortcut at the prompt's last
tokens that only this wording reaches (the locate-then-edit family's finding, ROME).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..core.training import Progress
from ..model.hooks import forward_hooks
from ..model.replay import skip_frozen_blocks
from ..model.specs import layer_index, mlp_module_name
from ..scoring.batches import TrainingBatch, target_nll_at

ANCHORS = ("all", "subject")  # where the loss reaches the edited blocks (`through_anchor`)


def check_anchor(anchor: str) -> None:
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {', '.join(map(repr, ANCHORS))}, not {anchor!r}")


def optimize(
    forward: Callable[[TrainingBatch], torch.Tensor],
    batch: TrainingBatch,
    optimizer: torch.optim.Optimizer,
    *,
    max_steps: int,
    after_step: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> int:
    """`optimizer`'s steps until every target token is the argmax; returns the steps taken. `forward(batch)`
    gives the logits (M, V) at the batch's target-predicting positions (`batch_target_logits`).
    `progress(step, max_steps, loss)` is called on every forward pass (step 0 = before any update)."""
    for step in range(max_steps + 1):
        loss, done = target_nll_at(forward(batch), batch.labels, batch.stop)
        if progress is not None:
            progress(step, max_steps, float(loss.detach()))
        if done or step == max_steps:
            return step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
    return max_steps


@contextlib.contextmanager
def above_trained_blocks(model: nn.Module, names: Sequence[str], batch: TrainingBatch) -> Iterator[None]:
    """Passes of `batch` inside the block start at the lowest block holding one of the trained parameters
    `names` (model/replay.py `skip_frozen_blocks`): the blocks below it are frozen, their output the same
    at every step."""
    lowest = min(layer_index(model, name) for name in names)
    with skip_frozen_blocks(model, lowest, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}):
        yield


@contextlib.contextmanager
def through_anchor(model: nn.Module, names: Sequence[str], batch: TrainingBatch) -> Iterator[None]:
    """Inside the block, the MLP output of every block holding one of `names` passes its gradient at
    `batch.anchor` only (each row's anchor position); elsewhere it is detached, same values. Nothing
    when the batch has no anchor."""
    if batch.anchor is None:
        yield
        return
    at_anchor = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=batch.input_ids.device)  # (B, T)
    at_anchor[torch.arange(len(at_anchor), device=at_anchor.device), batch.anchor] = True

    def anchored(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.where(at_anchor[..., None], output, output.detach())  # (B, T, d)

    outputs = {mlp_module_name(model, layer, "out") for layer in {layer_index(model, n) for n in names}}
    with forward_hooks(model, {name: anchored for name in outputs}):
        yield
