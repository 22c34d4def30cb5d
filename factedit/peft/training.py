"""The optimisation loop shared by the fine-tuning editors: an optimizer (Adam) on the trained tensors
until every target token is the argmax (checked on the same forward pass, before stepping), or after
`max_steps` steps. The batches and their loss are the core's (scoring/batches.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..core.training import Progress
from ..model.replay import skip_frozen_blocks
from ..model.specs import layer_index
from ..scoring.batches import TrainingBatch, target_nll_at


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
