"""What one edit changed: parameter norms and ranks, and predictions before and after."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import LOW_RANK
from ..core.errors import ConfigError
from ..core.record import EditRecord
from ..model.views import FunctionalModel
from ..model.weights import WeightState
from ..scoring.sequences import score_requests


@dataclass(frozen=True)
class ParamChange:
    name: str
    shape: tuple[int, ...]
    kind: str  # "dense" or "low_rank"
    fro_norm: float  # ‖Δ‖_F
    relative_norm: float  # ‖Δ‖_F / ‖W_base‖_F
    rank: int | None  # numerical rank of Δ (None: not computed, a dense Δ in a preview; see param_changes)


@dataclass(frozen=True)
class EditDiff:
    edit_id: str
    params: list[ParamChange]
    predictions: list[dict[str, Any]]  # per prompt: {"prompt", "before": top-k, "after": top-k}
    probes: list[dict[str, Any]] = field(default_factory=list)  # same shape, for probe prompts
    modules: list[ModuleChange] = field(default_factory=list)  # the side modules the edit adds

    def to_dict(self) -> dict[str, Any]:
        return {
            "edit_id": self.edit_id,
            "params": [vars(p) for p in self.params],
            "predictions": self.predictions,
            "probes": self.probes,
            "modules": [vars(m) for m in self.modules],
        }


@dataclass(frozen=True)
class ModuleChange:
    """A side module an edit adds (core/side.py): where, of which type, how large."""

    name: str
    type: str  # "codebook", "gated_neurons", "bottleneck"
    point: str  # the submodule whose output it changes
    shapes: dict[str, list[int]]  # tensor name -> shape
    num_params: int
    fro_norm: float  # ‖tensors‖_F over all of them


def module_changes(record: EditRecord) -> list[ModuleChange]:
    return [ModuleChange(name, m.type, m.point, {k: list(v.shape) for k, v in m.tensors.items()}, m.num_params(),
                         m.fro_norm()) for name, m in record.delta.modules.items()]


def param_changes(
    record: EditRecord, state: WeightState, model: nn.Module | None, ranks: bool = True,
) -> list[ParamChange]:
    """Per parameter the delta of `record` touches: norms and rank. A low-rank delta's rank comes from its
    factors (cheap); a dense one's needs an SVD of the whole matrix (0.1-0.3 s for the default model's
    MLP matrices on a CPU), computed only with `ranks` (else None: not computed)."""
    changes = []
    params = dict(model.named_parameters()) if model is not None else {}
    for name, pdelta in record.delta.items():
        dense = pdelta.materialize(torch.float32)  # (rows, cols)
        base = state.base.get(name)
        if base is None and name in params:
            base = params[name].detach().cpu()
        base_norm = float(base.float().norm()) if base is not None else float("nan")
        norm = float(dense.norm())
        if norm == 0:
            rank: int | None = 0
        elif pdelta.kind == LOW_RANK:
            rank = factor_rank(pdelta.left, pdelta.right)
        else:
            rank = int(torch.linalg.matrix_rank(dense)) if ranks else None
        changes.append(
            ParamChange(
                name=name, shape=tuple(dense.shape), kind=pdelta.kind, fro_norm=norm,
                relative_norm=norm / base_norm if base_norm else float("nan"), rank=rank,
            )
        )
    return changes


def factor_rank(left: torch.Tensor, right: torch.Tensor) -> int:
    """The numerical rank of `left @ right` ((m, r) @ (r, n)) as `torch.linalg.matrix_rank` gives it for the
    float32 product (singular values above σ_max · max(m, n) · eps(float32)), from the factors alone: with
    left = Q_l R_l and rightᵀ = Q_r R_r (thin QR, float64), the product's singular values are those of the
    r × r matrix R_l R_rᵀ."""
    r_left = torch.linalg.qr(left.detach().cpu().double(), mode="r").R  # (r, r) when m >= r
    r_right = torch.linalg.qr(right.detach().cpu().double().T, mode="r").R
    values = torch.linalg.svdvals(r_left @ r_right.T)
    if values.numel() == 0 or float(values[0]) == 0.0:
        return 0
    m, n = left.shape[0], right.shape[1]
    tolerance = float(values[0]) * max(m, n) * torch.finfo(torch.float32).eps
    return int((values > tolerance).sum())


def diff_edit(
    record: EditRecord,
    state: WeightState,
    tokenizer: PreTrainedTokenizerBase,
    model: nn.Module | None,
    probes: Sequence[str],
) -> EditDiff:
    predictions = [
        {"prompt": request.prompt, "before": pre["top"], "after": post["top"]}
        for request, pre, post in zip(
            record.requests, record.pre.get("requests", []), record.post.get("requests", []), strict=False
        )
    ]
    probe_rows: list[dict[str, Any]] = []
    if probes:
        if model is None:
            raise ConfigError("diff with probes needs the model: editor.diff(edit_id, model=model, probes=[...])")
        after = score_requests(model, tokenizer, [], probes=probes)["probes"]
        if record.id in state.active:
            without = state.weights_without(model, record.id)
            with torch.no_grad(), state.side_as(model, without=record.id):
                before_model = FunctionalModel(model, without)
                before = score_requests(before_model, tokenizer, [], probes=probes)["probes"]
        else:
            before = after  # a reverted edit changes nothing now
        probe_rows = [
            {"prompt": b["prompt"], "before": b["top"], "after": a["top"]} for b, a in zip(before, after, strict=True)
        ]
    return EditDiff(record.id, param_changes(record, state, model), predictions, probe_rows, module_changes(record))


