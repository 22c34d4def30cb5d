"""Applying and reverting deltas: the only code that writes model weights.

Apply is `W += Δ` in the parameter's dtype and device under `no_grad`; the first time a parameter is
touched its value is copied to the CPU as its base. Revert resets the reverted edit's parameters to
their base and re-adds the still-active deltas in their original order, so the weights are always
bit for bit what the active edits give when applied in order to the base.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..core.delta import Delta
from ..core.errors import EditNotFoundError, InvalidDeltaError


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype), with its dtype and shape."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module, samples_per_param: int = 2048) -> str:
    """A cheap identity of a model's architecture and weights: its config, every parameter's name,
    shape and dtype, and an evenly strided sample of each parameter's values. Two different
    checkpoints of one architecture differ in it; hashing every byte would cost seconds."""
    digest = hashlib.sha256(config_identity(model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // samples_per_param)
            sample = flat[::stride].to("cpu", torch.float64)
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}:".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def model_sha256(model: nn.Module) -> str:
    """sha256 of every parameter's name, shape, dtype and bytes: an exact identity of the weights
    (the journal's base-model check; about a second for the 135M default model)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}:".encode())
            digest.update(param.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


# Config keys that say how a model was loaded or saved, not what it is.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "name_or_path", "dtype", "torch_dtype", "use_cache"}


def config_identity(model: nn.Module) -> bytes:
    """The model's config as canonical JSON bytes, without private and volatile keys: what stays the
    same however the model was loaded."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(config, sort_keys=True, default=str).encode()


def checked_updates(params: Mapping[str, torch.Tensor], delta: Delta) -> dict[str, torch.Tensor]:
    """Each parameter's change as the weights would receive it (in the parameter's dtype and device),
    all materialised and checked before any is used: InvalidDeltaError for a delta that does not fit the
    parameters or overflows their dtype."""
    delta.check_against(params)
    updates = {name: pd.materialize(params[name].dtype, params[name].device) for name, pd in delta.items()}
    for name, update in updates.items():
        if not bool(torch.isfinite(update).all()):
            raise InvalidDeltaError(f"the delta for {name!r} overflows {params[name].dtype}; nothing was applied")
    return updates


class WeightState:
    """Base snapshots and the ordered active deltas of one model."""

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor] = {}  # parameter name -> CPU copy of its original value
        self.active: dict[str, Delta] = {}  # edit id -> delta, in application order

    def apply(self, model: nn.Module, edit_id: str, delta: Delta) -> None:
        """Add `delta` to the model's weights. Refused, with nothing changed, if it is invalid."""
        if edit_id in self.active:
            raise InvalidDeltaError(f"edit {edit_id} is already applied")
        params = dict(model.named_parameters())
        updates = checked_updates(params, delta)  # everything materialised before anything is written
        with torch.no_grad():
            for name in updates:
                if name not in self.base:
                    self.base[name] = params[name].detach().to("cpu", copy=True)
            for name, update in updates.items():
                params[name].add_(update)
        self.active[edit_id] = delta

    def revert(self, model: nn.Module, edit_id: str) -> None:
        """Remove one active edit; the others stay, exactly as if it had never been applied."""
        if edit_id not in self.active:
            raise EditNotFoundError(f"edit {edit_id} is not active")
        touched = set(self.active.pop(edit_id).names())
        self.rebuild(model, touched)

    def rebuild(self, model: nn.Module, names: Iterable[str]) -> None:
        """Set `names` to base + the active deltas, in order."""
        params = dict(model.named_parameters())
        names = [n for n in names if n in self.base]
        with torch.no_grad():
            for name in names:
                params[name].copy_(self.base[name])
            for delta in self.active.values():
                for name, pdelta in delta.items():
                    if name in names:
                        params[name].add_(pdelta.materialize(params[name].dtype, params[name].device))

    def restore_base(self, model: nn.Module) -> None:
        """Put every touched parameter back to its base value and forget all deltas."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.base.items():
                params[name].copy_(value)
        self.active.clear()

    def base_values(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Base values of those of `names` that an edit has touched (the others are still base)."""
        return {n: self.base[n] for n in names if n in self.base}

    def weights_without(self, model: nn.Module, edit_id: str) -> dict[str, torch.Tensor]:
        """The values the parameters of `edit_id` would have without it (the model is not changed)."""
        params = dict(model.named_parameters())
        names = self.active[edit_id].names()
        values = {n: self.base[n].to(params[n].device, copy=True) for n in names}
        for other_id, delta in self.active.items():
            if other_id == edit_id:
                continue
            for name, pdelta in delta.items():
                if name in values:
                    values[name].add_(pdelta.materialize(values[name].dtype, values[name].device))
        return values
