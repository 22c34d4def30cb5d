"""`ia3` edits as a PEFT IA³ adapter folder (`adapter_config.json` + `adapter_model.safetensors`) that
`PeftModel.from_pretrained(base_model, folder)` loads.

An `ia3` edit is stored as the dense change its vectors make once folded (model/scalings.py), so the
vectors are read back from the weights: per parameter the exported total T = W₀ + Σ Δ (W₀ the base
weight, the sum over the exported edits) is W₀ scaled along one axis, and each entry of the vector is the
least-squares factor of its slice, lⱼ = ⟨Tⱼ, W₀ⱼ⟩ / ⟨W₀ⱼ, W₀ⱼ⟩ (a bias entry joins its row's slice).
Several `ia3` edits of the same matrices compose by product, which this reads back as one vector. The
result is checked: W₀ with the vectors folded must give T to float32 rounding, else the export is
refused (another edit changed those weights before an `ia3` edit was trained on them).

The base W₀ is the current weight minus every active edit's change to it, which is why the caller passes
all active edits (oldest first, with their deltas) and picks the exported ones with `ids`.

PEFT applies the vectors at run time (feed-forward modules scale their input, the others their output)
where factedit folded them into the weights: the two agree to float rounding, not bit for bit
(tests/test_peft_ia3.py compares greedy tokens and logits within a tolerance).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.errors import EditNotFoundError, InvalidRequestError
from ..core.record import EditRecord
from ..model.scalings import Scaling, ia3_scalings
from .adapters import empty_folder, write_card, write_sidecar
from .peft_files import ADAPTER_WEIGHTS, PEFT_PREFIX

__all__ = ["IA3_METHOD", "IA3Export", "export_ia3_adapter", "ia3_vectors"]

IA3_METHOD = "ia3"
# Largest |W₀·l − T| allowed, relative to max |T| of the parameter times max(1, max |l|): float32 rounding.
# W₀ is read back as the weights less the edits' deltas, each rounded to float32 at the scale of T, and
# l multiplies that rounding: vectors far from 1 (entries of ±200 after a few edits of a tiny model)
# read back with errors near 1e-5 of max |T| where the scaling is exact.
_TOLERANCE = 1e-5


@dataclass(frozen=True)
class IA3Export:
    """What `export_ia3_adapter` wrote."""

    path: Path
    edits: tuple[str, ...]  # edit ids, in the order they were applied
    modules: tuple[str, ...]  # target modules (full names)
    feedforward: tuple[str, ...]  # those whose vector scales the input (the MLP down projections)
    # largest |W₀·l − T| / (max |T| · max(1, max |l|)) over the parameters: how closely the vectors give the edits
    max_error: float


def _chosen(active: Sequence[EditRecord], ids: Sequence[str] | None) -> list[EditRecord]:
    """The exported edits: `ids` (all active when None), each an `ia3` edit with its delta; refused before
    anything is written otherwise."""
    if isinstance(ids, str):
        raise InvalidRequestError(f"ids must be a list of edit ids (write [{ids!r}] for one)")
    by_id = {r.id: r for r in active}
    missing = [i for i in (ids or ()) if i not in by_id]
    if missing:
        raise EditNotFoundError(f"no active edit with id {', '.join(map(repr, missing))}")
    chosen = [r for r in active if ids is None or r.id in ids]
    if not chosen:
        raise EditNotFoundError("no active edits to export")
    other = [r for r in chosen if r.method != IA3_METHOD or r.delta is None or r.delta.modules]
    if other:
        raise InvalidRequestError(
            f"a PEFT IA³ adapter holds only ia3 edits (scaling vectors); edit(s) "
            f"{', '.join(f'{r.id} ({r.method})' for r in other)} are not, or carry no delta: export them as a "
            "LoRA adapter or a factedit edit file, or leave them out (ids=...)")
    return chosen


def _scalings(model: nn.Module, records: Sequence[EditRecord]) -> dict[str, Scaling]:
    """module -> the Scaling the records' configs name (layers, kv), each module once; refused when a
    record's delta touches a parameter outside them."""
    out: dict[str, Scaling] = {}
    for record in records:
        targets = ("mlp", "k", "v") if record.config.get("kv") else ("mlp",)
        found = {s.module: s for s in ia3_scalings(model, tuple(record.config["layers"]), targets)}
        stray = set(record.delta.params) - {n for s in found.values() for n in s.param_names()}
        if stray:
            raise InvalidRequestError(f"edit {record.id} (ia3) changes {sorted(stray)[0]}, which its config's "
                                      "vectors do not scale; it cannot be written as IA³ vectors")
        for module, scaling in found.items():
            known = out.setdefault(module, scaling)
            if known.side != scaling.side or known.size != scaling.size:
                raise InvalidRequestError(f"edits scale {module} in two different ways; export them apart")
    return out


def _base_and_total(model: nn.Module, active: Sequence[EditRecord], chosen: Sequence[EditRecord],
                    names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per parameter (float64, CPU): the base W₀ (current value minus every active edit's change) and
    the exported total T = W₀ + the chosen edits' changes."""
    params = dict(model.named_parameters())
    base = {n: params[n].detach().to("cpu", torch.float64) for n in names}
    total: dict[str, torch.Tensor] = {}
    for record in active:
        for name in names:
            if record.delta is not None and name in record.delta.params:
                base[name] = base[name] - record.delta.params[name].materialize(torch.float64)
    for name in names:
        total[name] = base[name] + sum((r.delta.params[name].materialize(torch.float64) for r in chosen
                                        if name in r.delta.params), torch.zeros_like(base[name]))
    return base, total


def _slices(scaling: Scaling, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The weight's slices along the vector's axis as rows, each with its bias entry: (length, m)."""
    rows = weight if scaling.axis == 0 else weight.T  # (length, other)
    return rows if bias is None else torch.cat([rows, bias[:, None]], dim=1)


def ia3_vectors(model: nn.Module, active: Sequence[EditRecord],
                ids: Sequence[str] | None = None) -> tuple[dict[str, Scaling], dict[str, torch.Tensor], float]:
    """(module -> Scaling, module -> its full vector (float32, one entry per input feature of a feed-forward
    module, per output feature otherwise), largest relative error) of the chosen `ia3` edits, read back
    from the weights (module docstring). InvalidRequestError when they are not `ia3` edits or the
    weights are not a product of vectors."""
    chosen = _chosen(active, ids)
    scalings = _scalings(model, chosen)
    names = [n for s in scalings.values() for n in s.param_names()]
    base, total = _base_and_total(model, active, chosen, names)
    vectors, worst = {}, 0.0
    for module, s in scalings.items():
        b0 = base[s.bias] if s.bias else None
        w0, t = _slices(s, base[s.weight], b0), _slices(s, total[s.weight], total[s.bias] if s.bias else None)
        norms = w0.pow(2).sum(1)  # (length,)
        vector = torch.where(norms > 0, (t * w0).sum(1) / norms.clamp_min(1e-300), torch.ones_like(norms))
        scale = t.abs().max().clamp_min(1e-30) * vector.abs().max().clamp_min(1.0)
        error = float((w0 * vector[:, None] - t).abs().max() / scale)
        if error > _TOLERANCE:
            raise InvalidRequestError(
                f"the edits' change to {module} is not a scaling of its base weights (relative error {error:.2g}); "
                "another edit changed them before an ia3 edit was trained on them: export the edits separately")
        worst = max(worst, error)
        vectors[module] = vector.float()
    return scalings, vectors, worst


def export_ia3_adapter(model: nn.Module, active: Sequence[EditRecord], path: str | os.PathLike,
                       *, ids: Sequence[str] | None = None) -> IA3Export:
    """Write the `ia3` edits `ids` (default: all of `active`) as one PEFT IA³ adapter folder.

    `active`: every active edit of `model`, oldest first, with its delta (e.g.
    `[editor.record(r.id) for r in editor.history if r.status == "active"]`), so the base weights can be
    told. Anything that is not an `ia3` edit is refused with InvalidRequestError before anything is
    written, as is a folder that already holds files."""
    records = list(active)
    scalings, vectors, error = ia3_vectors(model, records, ids)
    chosen = [r for r in records if ids is None or r.id in ids]
    feedforward = tuple(m for m, s in scalings.items() if s.side == "in")
    tensors = {f"{PEFT_PREFIX}{m}.ia3_l": (v[None, :] if scalings[m].side == "in" else v[:, None]).contiguous()
               for m, v in vectors.items()}  # (1, in) feed-forward, (out, 1) otherwise: peft's shapes

    from peft import IA3Config

    config = IA3Config(target_modules=list(scalings), feedforward_modules=list(feedforward), task_type="CAUSAL_LM",
                       inference_mode=True, base_model_name_or_path=chosen[0].model_id,
                       fan_in_fan_out=any(s.conv1d for s in scalings.values()))
    out = empty_folder(path)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    result = IA3Export(out, tuple(r.id for r in chosen), tuple(scalings), feedforward, error)
    write_sidecar(out, "peft_ia3", model, chosen, {"modules": list(scalings), "max_error": error})
    write_card(out, "peft_ia3", chosen, _notes(result))
    return result


def _notes(result: IA3Export) -> list[str]:
    return [f"(IA)³ vectors on {len(result.modules)} module(s), {len(result.feedforward)} of them feed-forward "
            "(input scaled); factedit folded them into the weights, PEFT applies them at run time: the two agree "
            f"to float rounding (largest relative difference of the weights {result.max_error:.2g}).", "",
            "```python", "from peft import PeftModel",
            f'model = PeftModel.from_pretrained(base_model, "{result.path.name}")', "```"]

