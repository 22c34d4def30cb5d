"""The optimisation loop shared by the fine-tuning editors.

Training text is `prompt + target` for every request, right-padded; the loss is the mean negative
log-likelihood of the target tokens. The loop stops as soon as every target token is the argmax
(checked on the same forward pass, before stepping), or after `max_steps` steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..editing.request import TokenizedRequest
from ..editing.scoring import pad_sequences

IGNORE = -100

# progress(step, max_steps, loss): what a caller is told while an editor trains (a UI's progress bar)
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainingBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): target ids at target positions, IGNORE elsewhere


def make_batch(requests: Sequence[TokenizedRequest], pad_id: int, device: torch.device) -> TrainingBatch:
    ids, mask = pad_sequences([r.input_ids for r in requests], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for row, r in enumerate(requests):
        start = len(r.prompt_ids)
        labels[row, start : start + len(r.target_ids)] = torch.tensor(r.target_ids)
    return TrainingBatch(ids.to(device), mask.to(device), labels.to(device))


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Mean NLL over target tokens, and whether every target token is already the argmax.

    logits: (B, T, V) for the whole sequence; labels: (B, T).
    """
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    shifted_labels = labels[:, 1:]  # (B, T-1)
    loss = nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=IGNORE
    )
    on_target = shifted_labels != IGNORE
    done = bool((shifted_logits.argmax(-1)[on_target] == shifted_labels[on_target]).all())
    return loss, done


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off gradients for every parameter and dropout; restore both on exit, also on error."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Fix torch's RNG inside the block (when seed is not None) without disturbing the caller's."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def optimize(
    forward: Callable[[TrainingBatch], torch.Tensor],
    batch: TrainingBatch,
    parameters: Sequence[torch.Tensor],
    *,
    lr: float,
    max_steps: int,
    after_step: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> int:
    """Adam on `parameters` until every target token is the argmax; returns the steps taken.
    `progress(step, max_steps, loss)` is called on every forward pass (step 0 = before any update)."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for step in range(max_steps + 1):
        loss, done = target_nll(forward(batch), batch.labels)
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
