"""A PEFT LoRA adapter folder read as one edit (adapters.py's docstring: import).

A LoRA adapter on MLP matrices becomes one low-rank delta (left = B·scaling, right = A, in the weight's
layout), applied by the Editor as one edit. Everything is checked before anything changes: peft type
and LoRA variants, base model (name, and shapes; the fingerprint too for factedit's own exports),
modules. Tensors are read from safetensors only, never from a pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..core.delta import Delta, ParamDelta
from ..core.errors import InvalidDeltaError, ModelMismatchError
from ..core.request import EditRequest
from ..model.specs import mlp_param_names, num_layers, spec_for, weight_layout
from .peft_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FACTOR_SUFFIXES,
    PEFT_PREFIX,
    PICKLED_WEIGHTS,
    PLACEHOLDER_PROMPT,
    SIDECAR,
    SIDECAR_FORMAT,
    UNFOLDABLE_FIELDS,
)

__all__ = ["ImportedAdapter", "read_adapter"]


@dataclass(frozen=True)
class ImportedAdapter:
    """A PEFT LoRA adapter read and checked against a model, ready to apply as one edit."""

    delta: Delta
    requests: tuple[EditRequest, ...]
    config: Mapping[str, Any]  # the record's config: adapter folder, base model, r, lora_alpha, source edits


def read_adapter(model: nn.Module, path: str | os.PathLike, *, model_id: str, fingerprint: str) -> ImportedAdapter:
    """Read a PEFT LoRA adapter folder and check it fits `model` (whose base has `model_id` and `fingerprint`).

    Refused with InvalidDeltaError: not a LoRA adapter, pickled weights, a LoRA variant or extra (DoRA,
    bias, modules_to_save, ...), modules that are not MLP matrices; with ModelMismatchError: another base
    model (its name, factedit's fingerprint, modules the model lacks, shapes). The model is not changed.
    """
    path = Path(path)
    config = _read_lora_config(path)
    recorded = config.base_model_name_or_path
    if recorded and recorded != model_id:  # adapters saved from a model built from a config name none
        raise ModelMismatchError(f"adapter {path} was made for base model {recorded!r}, not this one ({model_id!r})")
    sidecar = _read_sidecar(path)
    made_on = sidecar.get("model_fingerprint")
    if made_on and made_on != fingerprint:
        raise ModelMismatchError(
            f"adapter {path} was exported from another checkpoint of {model_id!r} (fingerprint {made_on}, this "
            f"model {fingerprint})"
        )
    pairs = _lora_pairs(path)
    deltas = _import_deltas(model, config, pairs, path)
    requests = tuple(EditRequest.from_dict(q) for e in sidecar.get("edits", []) for q in e["requests"])
    if not requests:  # a foreign adapter names no facts; the Editor still wants one request to record
        target = re.sub(r"[^A-Za-z0-9._-]", "", path.resolve().name) or "adapter"
        requests = (EditRequest(PLACEHOLDER_PROMPT, target),)
    edit_config = {
        "adapter": path.resolve().name, "base_model": recorded, "r": config.r, "lora_alpha": config.lora_alpha,
        "edits": [e.get("id") for e in sidecar.get("edits", [])],
    }
    return ImportedAdapter(Delta(deltas), requests, edit_config)


def _read_lora_config(path: Path) -> Any:
    """The adapter's LoraConfig, refused unless it is plain LoRA stored as safetensors."""
    from peft import PeftConfig, PeftType

    if not (path / ADAPTER_CONFIG).is_file():
        raise InvalidDeltaError(f"{path} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}")
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = [name for name in PICKLED_WEIGHTS if (path / name).exists()]
        if pickled:
            raise InvalidDeltaError(
                f"{path} keeps its weights in {pickled[0]}, a pickle, which factedit never loads (loading it can "
                "run code); save the adapter as safetensors (peft's save_pretrained does by default)"
            )
        raise InvalidDeltaError(f"{path} has no {ADAPTER_WEIGHTS}")
    try:
        config = PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InvalidDeltaError(f"cannot read {path / ADAPTER_CONFIG}: {exc}") from None
    if config.peft_type != PeftType.LORA:
        raise InvalidDeltaError(
            f"{path} is a {config.peft_type.value} adapter; factedit imports LoRA adapters only (their B·A "
            "folds into the weights as a low-rank edit)"
        )
    variants = [f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant")]
    found = [name for name in (*variants, *UNFOLDABLE_FIELDS) if getattr(config, name, None)]
    if config.bias != "none":
        found.append(f"bias={config.bias!r}")
    if found:
        raise InvalidDeltaError(
            f"{path} uses {', '.join(found)}: not a plain LoRA adapter whose change is W += B·A·scaling on the "
            "targeted matrices, so it cannot be imported as an edit"
        )
    return config


def _read_sidecar(path: Path) -> dict[str, Any]:
    """factedit.json of an adapter factedit exported ({} for a foreign adapter)."""
    file = path / SIDECAR
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
        if data.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {SIDECAR_FORMAT!r}")
        if not all(isinstance(e, dict) and isinstance(e.get("requests"), list) for e in data.get("edits", [])):
            raise ValueError("every edit needs its list of requests")
        return data
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidDeltaError(f"unreadable {file}: {exc}") from None


def _lora_pairs(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"A": (r, in), "B": (out, r)} from adapter_model.safetensors; any other key is refused."""
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise InvalidDeltaError(f"cannot read {path / ADAPTER_WEIGHTS}: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PEFT_PREFIX) or suffix is None:
            raise InvalidDeltaError(
                f"{path} holds {key!r}, which is not a LoRA A/B weight of a causal LM module (e.g. a bias, an "
                "embedding LoRA, a DoRA magnitude); factedit imports LoRA on MLP matrices only"
            )
        pairs.setdefault(key[len(PEFT_PREFIX):-len(suffix)], {})[FACTOR_SUFFIXES[suffix]] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise InvalidDeltaError(f"{path}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
    if not pairs:
        raise InvalidDeltaError(f"{path} holds no LoRA weights")
    return pairs


def _import_deltas(
    model: nn.Module, config: Any, pairs: Mapping[str, Mapping[str, torch.Tensor]], path: Path
) -> dict[str, ParamDelta]:
    """The adapter's change per parameter, as low-rank factors in the weight's layout, in model order."""
    from peft.utils.other import get_pattern_key  # how peft itself resolves rank_pattern / alpha_pattern

    params = dict(model.named_parameters())
    spec = spec_for(model)
    mlp = set(mlp_param_names(model, range(num_layers(model)), spec.roles))
    for module in pairs:
        name = f"{module}.weight"
        if name not in params:
            raise ModelMismatchError(f"adapter {path} adapts {module}, which this model does not have")
        if name not in mlp:
            raise InvalidDeltaError(
                f"adapter {path} adapts {module}, which is not an MLP matrix of this {spec.name!r} model; factedit "
                f"imports LoRA on the MLP matrices ({', '.join(spec.mlp_modules.values())}) only"
            )
    deltas = {}
    for name in (n for n in params if n.removesuffix(".weight") in pairs):
        module = name.removesuffix(".weight")
        a, b = pairs[module]["A"], pairs[module]["B"]  # (r, in), (out, r)
        layout = weight_layout(model, name)
        rows, cols = params[name].shape
        out_features, in_features = (rows, cols) if layout == "out_in" else (cols, rows)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (a.shape[1], b.shape[0]) != (
                in_features, out_features):
            raise ModelMismatchError(
                f"adapter {path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; this model "
                f"needs (r, {in_features}) and ({out_features}, r): its shapes differ, it was made for another model"
            )
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        if a.shape[0] != r:
            raise InvalidDeltaError(f"adapter {path}: {module} has rank {a.shape[0]} but its config says r = {r}")
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r  # as peft's LoraLayer
        a, b = a.float(), (b.double() * scaling).float()
        # Drop rank components that add nothing (an export's zero padding); keep one for an all-zero module.
        keep = (a != 0).any(dim=1) & (b != 0).any(dim=0)
        if not keep.any():
            keep[0] = True
        deltas[name] = ParamDelta.from_lora(a[keep], b[:, keep], layout)  # (k, in), (out, k) kept
    return deltas
