"""Edits as standard artifacts: PEFT LoRA adapter folders and merged HuggingFace model folders.

Export to LoRA. Per parameter, the low-rank factors of the chosen edits are stacked side by side
(Σᵢ LᵢRᵢ = [L₁ … Lₖ]·[R₁; …; Rₖ], so ranks add); the dense part of a parameter (ft, ft_l) is replaced by
its truncated SVD at a rank the caller chooses, and its relative error ‖Δ−Δ_r‖_F/‖Δ‖_F is reported. Every
module is zero-padded to one rank r, the smallest value vLLM's `--max-lora-rank` accepts (VLLM_RANKS),
and lora_alpha = r, so peft's scaling alpha/r is 1 and B·A is the change itself. Factors are stored in
float32 (peft keeps adapters in float32 by default).

Layouts. peft stores lora_A as (r, in) and lora_B as (out, r) for every module, GPT-2's Conv1D included
(it then sets fan_in_fan_out and transposes B·A onto the (in, out) weight). factedit's factors are in
the weight's own layout (delta.py), told by the ModelSpec: Linear (out, in) = left @ right gives
B = left, A = right; Conv1D (in, out) = left @ right gives A = leftᵀ, B = rightᵀ.

target_modules lists full module paths ("model.layers.8.mlp.gate_proj"): peft then wraps exactly the
edited modules (a short name such as "gate_proj" would wrap that matrix in every layer), and vLLM, which
checks the safetensors keys by their last component (gate_proj/up_proj/down_proj on Llama-family
models), accepts them.

Import (peft_import.py, re-exported here): a LoRA adapter on MLP matrices becomes one low-rank delta,
applied by the Editor as one edit, everything checked before anything changes, safetensors only.

Besides peft's files, both kinds of export hold a model card (README.md) listing the edits and
`factedit.json` (the edits' requests, the base model's id and fingerprint), from which an import takes
the original requests back. peft is imported where it is used: `import factedit` does not load it.
File names and peft's key layout are in peft_files.py.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from .._version import __version__
from ..core.delta import DENSE, ParamDelta
from ..core.errors import ConfigError, EditNotFoundError, InvalidRequestError
from ..core.record import EditRecord
from ..model.specs import weight_layout
from .peft_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD,
    FACTOR_SUFFIXES,
    IMPORT_METHOD,
    PEFT_PREFIX,
    PLACEHOLDER_PROMPT,
    SIDECAR,
    SIDECAR_FORMAT,
)
from .peft_import import ImportedAdapter, read_adapter

__all__ = [
    "IMPORT_METHOD",
    "PLACEHOLDER_PROMPT",
    "VLLM_LORA_MODULES",
    "VLLM_RANKS",
    "AdapterExport",
    "ImportedAdapter",
    "LoraFactors",
    "check_vllm_compatible",
    "export_adapter",
    "export_merged",
    "lora_factors",
    "padded_rank",
    "read_adapter",
]

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
# Module names vLLM's LoRA layers take on Llama-family models (it matches the last component of a name).
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


# --- export -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterExport:
    """What `export_adapter` wrote."""

    path: Path
    rank: int  # the adapter's r: the largest stacked rank of a module, padded up to VLLM_RANKS
    edits: tuple[str, ...]  # edit ids, in the order they were applied
    modules: tuple[str, ...]  # target modules (full names)
    svd_rank: int | None = None  # rank of the truncated SVD of dense parts (None: there were none)
    # parameter -> ‖Δ−Δ_r‖_F / ‖Δ‖_F of its dense part (only parameters that had one)
    svd_errors: Mapping[str, float] = field(default_factory=dict)


def padded_rank(needed: int) -> int:
    """The smallest rank in VLLM_RANKS that holds `needed`; past 512 a ConfigError."""
    for rank in VLLM_RANKS:
        if rank >= needed:
            return rank
    raise ConfigError(
        f"these edits need LoRA rank {needed}, more than {VLLM_RANKS[-1]}, the largest rank vLLM serves; "
        "export fewer edits at a time (ids=...), a lower SVD rank for dense edits, or the merged model"
    )


def export_adapter(
    model: nn.Module,
    records: Sequence[EditRecord],
    path: str | os.PathLike,
    *,
    rank: int | None = None,
    exact: bool = False,
) -> AdapterExport:
    """Write `records` (active edits of `model`, with their deltas) as one PEFT LoRA adapter folder.

    Low-rank deltas are exact. Dense ones (ft, ft_l) need `rank` for a truncated SVD (see
    AdapterExport.svd_errors), and are refused with `exact=True`. Nothing is written when refused.
    """
    records = list(records)
    factors = lora_factors(model, records, rank=rank, exact=exact)
    layouts, errors = factors.layouts, dict(factors.svd_errors)
    r = padded_rank(max(a.shape[0] for a, _ in factors.pairs.values()))
    tensors = {}
    for name, (a, b) in factors.pairs.items():  # (k, in), (out, k)
        module = name.removesuffix(".weight")
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = F.pad(a, (0, 0, 0, r - a.shape[0])).contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = F.pad(b, (0, r - b.shape[1])).contiguous()  # (out, r)
    modules = tuple(name.removesuffix(".weight") for name in factors.pairs)

    from peft import LoraConfig

    config = LoraConfig(
        r=r, lora_alpha=r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", inference_mode=True,
        target_modules=list(modules), base_model_name_or_path=records[0].model_id,
        fan_in_fan_out=any(layout == "in_out" for layout in layouts.values()),
    )
    out = empty_folder(path)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})  # peft's own metadata
    result = AdapterExport(out, r, tuple(rec.id for rec in records), modules, rank if errors else None, errors)
    write_sidecar(out, "peft_lora", model, records, {"rank": r, "svd_rank": result.svd_rank, "svd_errors": errors})
    write_card(out, "peft_lora", records, _adapter_notes(result))
    return result


def export_merged(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[EditRecord], path: str | os.PathLike
) -> Path:
    """Write `model` as it is (base + the active `records`) as a HuggingFace folder: safetensors weights,
    config, tokenizer, a model card listing the edits. `AutoModelForCausalLM.from_pretrained` loads it."""
    refuse_side_modules(records, "a merged model")
    out = empty_folder(path)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_sidecar(out, "merged", model, records, {})
    write_card(out, "merged", records, [
        "The weights are the base model's with these edits added (`W + Δ`), in the base model's dtype.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{out.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{out.name}")',
        "```",
    ])
    return out


@dataclass(frozen=True)
class LoraFactors:
    """The change of some edits per parameter as LoRA pairs, before any padding (what `lora_factors` gives)."""

    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # parameter -> (A (k, in), B (out, k)), B·A = change
    layouts: Mapping[str, str]  # parameter -> its weight layout ("out_in" Linear, "in_out" Conv1D)
    svd_rank: int | None = None  # rank of the truncated SVD of dense parts (None: there were none)
    svd_errors: Mapping[str, float] = field(default_factory=dict)  # parameter -> ‖Δ−Δ_r‖_F / ‖Δ‖_F


def refuse_side_modules(records: Sequence[EditRecord], what: str) -> None:
    """InvalidRequestError, before anything is written, when an edit adds side modules (grace, tpatcher,
    adapter: core/side.py): they are hooks, not weights, so no LoRA adapter or plain weights hold them."""
    added = [r for r in records if r.delta is not None and r.delta.modules]
    if added:
        raise InvalidRequestError(
            f"edit(s) {', '.join(r.id for r in added)} ({added[0].method}) add side modules, which {what} "
            "cannot hold; export them with Editor.export_edit (a factedit edit file), or leave them out (ids=...)"
        )


def lora_factors(
    model: nn.Module, records: Sequence[EditRecord], *, rank: int | None = None, exact: bool = False
) -> LoraFactors:
    """`records`' changes per parameter (model order of first appearance) as float32 LoRA pairs in peft's
    layout: low-rank factors stacked side by side (exact), the summed dense part as its truncated SVD of
    `rank` (dense parts refused without `rank`, or with `exact=True`). Every LoRA export goes through this."""
    records = list(records)
    if not records:
        raise EditNotFoundError("no active edits to export")
    refuse_side_modules(records, "a LoRA adapter")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    _check_dense(records, rank, exact)
    _check_matrices(records)
    names = list(dict.fromkeys(name for r in records for name in r.delta.names()))
    layouts = {name: weight_layout(model, name) for name in names}  # refuses what is not a Linear/Conv1D weight
    pairs, errors = {}, {}
    for name in names:
        (left, right), error = _stacked_factors([r.delta.params[name] for r in records if name in r.delta.params],
                                                rank)
        if error is not None:
            errors[name] = error
        pairs[name] = ParamDelta(left=left, right=right).lora_pair(layouts[name])  # (k, in), (out, k)
    return LoraFactors(pairs, layouts, rank if errors else None, errors)


def _check_matrices(records: Sequence[EditRecord]) -> None:
    """A LoRA adapter holds changes of weight matrices only: an edit that also changes a bias (an `ia3`
    edit with `kv` on a model whose keys/values have biases) is refused by name."""
    for record in records:
        others = [name for name in record.delta.names() if not name.endswith(".weight")]
        if others:
            raise ConfigError(
                f"edit {record.id} ({record.method}) changes {others[0]!r}, which is not a weight matrix: a LoRA "
                "adapter cannot hold it; export ia3 edits with format 'peft-ia3', or export the merged model"
            )


def _check_dense(records: list[EditRecord], rank: int | None, exact: bool) -> None:
    dense = [r for r in records if any(p.kind == DENSE for p in r.delta.params.values())]
    if not dense:
        return
    named = ", ".join(f"{r.id} ({r.method})" for r in dense)
    if exact:
        raise ConfigError(
            f"exact export refused: edits {named} are dense; a LoRA adapter can hold them only approximately "
            "(truncated SVD). Export without exact and with a rank, choose the low-rank edits with ids=..., "
            "or export the merged model"
        )
    if rank is None:
        raise ConfigError(
            f"edits {named} are dense: give rank=R (CLI: --rank R) to export them through a truncated SVD of "
            "rank R (the relative error is reported), or export the merged model"
        )


def _stacked_factors(
    pdeltas: Sequence[ParamDelta], rank: int | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], float | None]:
    """One parameter's edits as (left, right) in its layout, low-rank factors stacked side by side, the
    summed dense part (if any) as its truncated SVD; and that SVD's relative error (None: no dense part)."""
    lefts = [p.left.float() for p in pdeltas if p.kind != DENSE]  # each (rows, k_i)
    rights = [p.right.float() for p in pdeltas if p.kind != DENSE]  # each (k_i, cols)
    error = None
    dense = [p.dense for p in pdeltas if p.kind == DENSE]
    if dense:
        total = torch.stack([d.double() for d in dense]).sum(0)  # (rows, cols)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)  # (rows, m), (m,), (m, cols)
        k = min(rank, s.numel())
        root = s[:k].sqrt()  # split each singular value evenly between the factors
        left, right = (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float()  # (rows, k), (k, cols)
        norm = torch.linalg.matrix_norm(total)
        residual = torch.linalg.matrix_norm(total - left.double() @ right.double())
        error = float(residual / norm) if norm > 0 else 0.0
        lefts.append(left)
        rights.append(right)
    return (torch.cat(lefts, dim=1), torch.cat(rights, dim=0)), error


def _adapter_notes(result: AdapterExport) -> list[str]:
    notes = [f"LoRA rank r = {result.rank}, lora_alpha = {result.rank} (scaling 1): B·A is the change itself; "
             "low-rank edits are stacked per module, padded with zeros to a rank vLLM accepts."]
    if result.svd_errors:
        notes += ["", f"Dense edits are approximated by a truncated SVD of rank {result.svd_rank}; relative error "
                      "‖Δ−Δ_r‖_F/‖Δ‖_F per parameter:", ""]
        notes += [f"- `{name}`: {error:.3g}" for name, error in result.svd_errors.items()]
    notes += ["", "```python", "from peft import PeftModel",
              f'model = PeftModel.from_pretrained(base_model, "{result.path.name}")', "```", "",
              f"vLLM: `vllm serve <base model> --enable-lora --lora-modules facts={result.path.name} "
              f"--max-lora-rank {result.rank}`"]
    return notes


# --- the files every export writes ------------------------------------------------------------------
def empty_folder(path: str | os.PathLike) -> Path:
    """`path` as a folder to write into: created, or refused when it already holds files."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _edit_summary(record: EditRecord) -> dict[str, Any]:
    return {"id": record.id, "method": record.method, "config": dict(record.config), "created_at": record.created_at,
            "requests": [q.to_dict() for q in record.requests]}


def write_sidecar(out: Path, kind: str, model: nn.Module, records: Sequence[EditRecord], extra: Mapping) -> None:
    first = records[0] if records else None
    data = {
        "format": SIDECAR_FORMAT, "kind": kind, "factedit_version": __version__,
        "model_id": first.model_id if first else None,
        "model_fingerprint": first.model_fingerprint if first else None,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        **extra,
        "edits": [_edit_summary(r) for r in records],
    }
    (out / SIDECAR).write_text(json.dumps(data, indent=1) + "\n")


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def write_card(out: Path, kind: str, records: Sequence[EditRecord], notes: Iterable[str]) -> None:
    library = "peft" if kind.startswith("peft") else "transformers"
    title = {"peft_lora": "PEFT LoRA adapter", "peft_ia3": "PEFT IA³ adapter"}.get(kind, "edited model")
    model_id = records[0].model_id if records else "?"
    lines = ["---", f"library_name: {library}", "tags:", "- factedit", "- knowledge-editing", "---", "",
             f"# factedit: {title}", "",
             f"{len(records)} fact edit(s) made with factedit {__version__} on the base model `{model_id}`"
             + (f" (fingerprint `{records[0].model_fingerprint}`)." if records else "."), "",
             "| edit | method | prompt → target | date (UTC) |", "|---|---|---|---|"]
    for record in records:
        date = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created_at))
        facts = "<br>".join(f"{_cell(q.prompt)} → {_cell(q.target)}" for q in record.requests)
        lines.append(f"| `{record.id}` | {record.method} | {facts} | {date} |")
    lines += ["", *notes, ""]
    (out / CARD).write_text("\n".join(lines))


# --- serving constraints ----------------------------------------------------------------------------
def check_vllm_compatible(adapter_dir: str | os.PathLike) -> list[str]:
    """What keeps vLLM from serving this PEFT adapter folder (an empty list: nothing found).

    Checked against vLLM's documented LoRA constraints: a LoRA adapter stored as safetensors, one rank r
    (no rank_pattern / alpha_pattern) that is a --max-lora-rank value (VLLM_RANKS), bias "none", no
    modules_to_save, no DoRA, and modules whose last name component is one vLLM's Llama-family LoRA
    layers take (VLLM_LORA_MODULES: attention q/k/v/o_proj and MLP gate/up/down_proj), with lora_A
    (r, in) and lora_B (out, r) tensors.
    """
    path = Path(adapter_dir)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        return [f"cannot read {path / ADAPTER_CONFIG}: {exc}"]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    r = config.get("r")
    if r not in VLLM_RANKS:
        problems.append(f"r = {r!r} is not one of vLLM's ranks {VLLM_RANKS}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern give modules their own ranks; vLLM takes one max rank")
    if config.get("bias", "none") != "none":
        problems.append(f"bias = {config.get('bias')!r}; vLLM needs 'none'")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set; vLLM supports none")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported by vLLM")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        problems.append("target_modules is a regular expression; list the module names instead")
        targets = []
    modules, tensor_problems = _vllm_tensor_modules(path, r)
    names = {str(t).rsplit(".", 1)[-1] for t in [*(targets or ()), *modules]}
    if not names or not names <= VLLM_LORA_MODULES:
        problems.append(f"modules {sorted(names - VLLM_LORA_MODULES) or 'none'} are not among those vLLM adapts "
                        f"on Llama-family models: {sorted(VLLM_LORA_MODULES)}")
    return problems + tensor_problems


def _vllm_tensor_modules(path: Path, r: Any) -> tuple[list[str], list[str]]:
    """The modules adapter_model.safetensors adapts, and what in it vLLM would refuse."""
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        return [], [f"no {ADAPTER_WEIGHTS}"]
    modules, problems = [], []
    with safe_open(str(file), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = tuple(tensors.get_slice(key).get_shape())
            suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
            if suffix is None or not key.startswith(PEFT_PREFIX):
                problems.append(f"tensor {key!r} is not a LoRA A/B weight")
                continue
            modules.append(key[len(PEFT_PREFIX):-len(suffix)])
            if len(shape) != 2 or shape[0 if FACTOR_SUFFIXES[suffix] == "A" else 1] != r:
                problems.append(f"tensor {key!r} has shape {shape}, not rank {r}")
    return modules, problems
