"""Applying and reverting deltas: the only code that writes model weights.

Apply is `W += Δ` in the parameter's dtype and device under `no_grad`; the first time a parameter is
touched its value is copied to the CPU as its base. Revert resets the reverted edit's parameters to
their base and re-adds the still-active deltas in their original order, so the weights are always
bit for bit what the active edits give when applied in order to the base.

Side modules (core/side.py) are attached the same way: the hooks on the model are always those the
active edits' modules give, in the edits' order. Every apply or revert that involves one removes the
hooks and attaches them again from the active edits, so what the model computes is a function of the
active edits alone. These hooks are the one exception to "hooks only inside a context manager"
(design.md, invariant 6): they ARE the edit; revert, `restore_base` and `detach_side` remove them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core.delta import Delta
from ..core.errors import EditNotFoundError, InvalidDeltaError
from ..core.side import SideModule, prepared, run_modules
from .specs import num_layers, spec_for


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


def side_points(model: nn.Module) -> list[str]:
    """Where side modules may attach: each block's MLP (input and output (B, T, d) on every supported
    architecture), e.g. "model.layers.3.mlp"."""
    spec = spec_for(model)
    mlp = spec.mlp_modules["out"].rpartition(".")[0]
    return [f"{spec.layers_path}.{i}.{mlp}" for i in range(num_layers(model))]


def check_side_modules(model: nn.Module, delta: Delta) -> None:
    """Refuse side modules whose point is not a block's MLP (`side_points`) or whose width is not the
    model's hidden size (their types and values were checked when they were built)."""
    if not delta.modules:
        return
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    points = side_points(model)
    for name, module in delta.modules.items():
        if module.point not in points:
            raise InvalidDeltaError(f"side module {name!r}: {module.point!r} is not a point side modules attach "
                                    f"at (a block's MLP: {points[0]} … {points[-1]})")
        if hidden is not None and module.hidden_size() != hidden:
            raise InvalidDeltaError(f"side module {name!r} is {module.hidden_size()} wide; the model's hidden "
                                    f"size is {hidden}")


_SIDE_TAG = "factedit_side_hook"  # marks the hooks of side modules (and their copies in a read view)


def _side_hook(modules: list[SideModule]):
    def hook(point: nn.Module, args: tuple, output: object) -> torch.Tensor:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            raise InvalidDeltaError(f"a side module's point must take and return one tensor ({type(point).__name__})")
        return run_modules(modules, args[0], output)  # (B, T, d)

    setattr(hook, _SIDE_TAG, True)
    return hook


def register_side(model: nn.Module, deltas: Iterable[Delta]) -> list[RemovableHandle]:
    """Hook the side modules of `deltas`, in order, onto `model`: one hook per point, running its modules
    in the model's dtype and device. Returns the handles."""
    by_point: dict[str, list[SideModule]] = {}
    for delta in deltas:
        for module in delta.modules.values():
            by_point.setdefault(module.point, []).append(module)
    param = next(model.parameters())
    return [model.get_submodule(point).register_forward_hook(_side_hook(prepared(modules, param.dtype, param.device)))
            for point, modules in by_point.items()]


def _take_side_hooks(model: nn.Module) -> list[tuple[nn.Module, int, object]]:
    """Remove the side-module hooks from `model`'s MLPs (a read view has copies of the model's own) and
    return them, to be put back."""
    taken = []
    for point in side_points(model):
        module = model.get_submodule(point)
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, _SIDE_TAG, False):
                taken.append((module, key, module._forward_hooks.pop(key)))
    return taken


class WeightState:
    """Base snapshots, the ordered active deltas of one model, and the hooks of their side modules."""

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor] = {}  # parameter name -> CPU copy of its original value
        self.active: dict[str, Delta] = {}  # edit id -> delta, in application order
        self._handles: list[RemovableHandle] = []  # the attached side modules' hooks

    @property
    def side_points(self) -> list[str]:
        """The points the active edits' side modules are attached at, in order, each once."""
        return list(dict.fromkeys(m.point for d in self.active.values() for m in d.modules.values()))

    def attach_side(self, model: nn.Module) -> None:
        """Replace the model's side-module hooks by those of the active edits, in order."""
        self.detach_side()
        self._handles = register_side(model, self.active.values())

    def detach_side(self) -> None:
        """Remove every side-module hook (the weights stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def side_as(self, model: nn.Module, *, extra: Delta | None = None, without: str | None = None) -> Iterator[None]:
        """Inside the block `model` (the bound model or a read view of it) runs the side modules of the
        active edits without `without` and with `extra` after them (a preview, a diff); its own hooks are
        put back on exit, also on error."""
        changes = (extra is not None and extra.modules) or (without is not None and self.active[without].modules)
        if not changes:
            yield
            return
        if extra is not None:
            check_side_modules(model, extra)
        deltas = [d for i, d in self.active.items() if i != without] + ([extra] if extra is not None else [])
        taken = _take_side_hooks(model)
        handles: list[RemovableHandle] = []
        try:
            handles = register_side(model, deltas)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, key, hook in taken:
                module._forward_hooks[key] = hook

    def keep_base(self, model: nn.Module, names: Sequence[str]) -> None:
        """Keep the current values of `names` as their base, as an edit touching them would (a replayed
        journal's reverted edits touched them: the state is then the one its writer had)."""
        params = dict(model.named_parameters())
        for name in names:
            if name in params and name not in self.base:
                self.base[name] = params[name].detach().to("cpu", copy=True)

    def apply(self, model: nn.Module, edit_id: str, delta: Delta) -> None:
        """Add `delta` to the model's weights and attach its side modules. Refused, with nothing changed,
        if it is invalid."""
        if edit_id in self.active:
            raise InvalidDeltaError(f"edit {edit_id} is already applied")
        params = dict(model.named_parameters())
        check_side_modules(model, delta)
        updates = checked_updates(params, delta)  # everything materialised before anything is written
        with torch.no_grad():
            for name in updates:
                if name not in self.base:
                    self.base[name] = params[name].detach().to("cpu", copy=True)
            for name, update in updates.items():
                params[name].add_(update)
        self.active[edit_id] = delta
        if delta.modules:
            self.attach_side(model)

    def revert(self, model: nn.Module, edit_id: str, without: Mapping[str, torch.Tensor] | None = None) -> None:
        """Remove one active edit; the others stay, exactly as if it had never been applied. `without`:
        `weights_without(model, edit_id)` when the caller already has it (the same values, not rebuilt)."""
        if edit_id not in self.active:
            raise EditNotFoundError(f"edit {edit_id} is not active")
        if without is None:
            without = self.weights_without(model, edit_id)
        removed = self.active.pop(edit_id)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in without.items():
                params[name].copy_(value)
        if removed.modules:
            self.attach_side(model)

    def restore_base(self, model: nn.Module) -> None:
        """Put every touched parameter back to its base value and forget all deltas."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.base.items():
                params[name].copy_(value)
        self.active.clear()
        self.detach_side()

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
