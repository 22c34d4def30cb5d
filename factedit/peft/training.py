"""The optimisation loop shared by the fine-tuning editors: an optimizer (Adam) on the trained tensors
until every target token is the argmax (checked on the same forward pass, before stepping), or after
`max_steps` steps. The batches and their loss are the core's (scoring/batches.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.training import Progress
from ..scoring.batches import TrainingBatch, target_nll


def optimize(
    forward: Callable[[TrainingBatch], torch.Tensor],
    batch: TrainingBatch,
    optimizer: torch.optim.Optimizer,
    *,
    max_steps: int,
    after_step: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> int:
    """`optimizer`'s steps until every target token is the argmax; returns the steps taken.
    `progress(step, max_steps, loss)` is called on every forward pass (step 0 = before any update)."""
    for step in range(max_steps + 1):
        loss, done = target_nll(forward(batch), batch.labels, batch.stop)
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
