"""Capture of MEND's inputs: per edited matrix, the rows u_t and δ_t at the positions that matter.

One forward and one backward pass of the frozen base model. The edit loss is the sum over requests
of each request's mean per-token NLL of its target, so one request's δ does not depend on how many
others share the batch. Autograd runs only down to the earliest edited matrix (see
`capture_linear_io`), and the language-model head is evaluated only at the positions that predict
target tokens (`logits_to_keep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model.hooks import capture_linear_io
from ..scoring.batches import IGNORE, TrainingBatch, loss_positions, next_tokens
from ..scoring.sequences import logits_at


@dataclass(frozen=True)
class Captured:
    """u/δ rows per edited parameter name, and the edit loss they came from."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (u (N, d_in), δ (N, d_out))
    loss: float
    logits: torch.Tensor  # (M, V) detached: pre-edit logits at `select`, row-major
    select: torch.Tensor  # (B, T) positions predicting any row's labelled tokens (edit rows or not)
    owners: torch.Tensor  # (N,) long: the batch row each u/δ row came from


def per_request_nll(logits: torch.Tensor, labels: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of each row's labelled tokens, from logits (M, V) at `select` (B, T).

    Returns (B,); rows without labelled tokens get 0.
    """
    targets = next_tokens(labels)[select]  # (M,)
    row_ids = select.nonzero()[:, 0]  # (M,)
    valid = targets != IGNORE
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid  # (M,)
    n_rows = labels.shape[0]
    total = torch.zeros(n_rows, device=logits.device).index_add(0, row_ids, -picked)
    count = torch.zeros(n_rows, device=logits.device).index_add(0, row_ids, valid.float())
    return total / count.clamp(min=1)


def capture(
    model: nn.Module,
    module_names: Sequence[str],
    param_names: Sequence[str],
    batch: TrainingBatch,
    rows: torch.Tensor | None = None,
    positions: str = "loss",
    params: dict[str, torch.Tensor] | None = None,
) -> Captured:
    """Run the edit loss forward and backward on the frozen `model` and collect u/δ rows.

    module_names[i] owns param_names[i]. `rows` (B,) bool selects the rows that are edits (others,
    e.g. locality prompts sharing the pass, contribute nothing); default: all rows.
    positions: "loss" keeps the positions predicting a target token; "all" every non-padding one;
    "subject" each row's `batch.anchor` (the subject's last token: the edit keyed on the subject, as
    the locate-then-edit family keys it, so every wording that names the subject reads it).
    params: tensors the pass uses instead of the model's own (functional_call; e.g. W + ΔW of a first
    step), the model is not written.
    The caller must have frozen the model (no parameter requires grad).
    """
    edit_rows = torch.ones(batch.labels.shape[0], dtype=torch.bool, device=batch.labels.device)
    if rows is not None:
        edit_rows = rows.to(batch.labels.device)
    labels = batch.labels.masked_fill(~edit_rows[:, None], IGNORE)  # (B, T)
    target_mask = loss_positions(labels)  # (B, T)
    all_targets = loss_positions(batch.labels)  # (B, T)
    with torch.enable_grad(), capture_linear_io(model, module_names) as io:
        logits = logits_at(model, batch.input_ids, batch.attention_mask, all_targets, params=params)  # (M, V)
        loss = per_request_nll(logits, labels, all_targets)[edit_rows].sum()
        loss.backward()
    if positions == "loss":
        select = target_mask
    elif positions == "subject":
        if batch.anchor is None:
            raise ValueError('positions="subject" needs the batch\'s anchors (the subject\'s last token)')
        select = torch.zeros_like(target_mask)
        select[torch.arange(select.shape[0], device=select.device), batch.anchor] = True
        select &= edit_rows[:, None]  # (B, T): one position a row
    else:
        select = batch.attention_mask.bool() & edit_rows[:, None]  # (B, T)
    factors = {}
    for module, param in zip(module_names, param_names, strict=True):
        u = io.inputs[module][select]  # (N, d_in)
        grad = io.output_grads.get(module)
        if grad is None:  # the module does not influence the loss (cannot happen for MLP matrices)
            grad = torch.zeros(*io.inputs[module].shape[:2], _out_features(model, module), device=u.device)
        factors[param] = (u, grad[select])  # (N, d_in), (N, d_out)
    owners = select.nonzero()[:, 0]  # (N,) row-major, as the boolean indexing above
    return Captured(factors, float(loss.detach()), logits.detach(), all_targets, owners)


def _out_features(model: nn.Module, module_name: str) -> int:
    module = model.get_submodule(module_name)
    return int(getattr(module, "out_features", None) or module.nf)
