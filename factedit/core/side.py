"""Side modules: what an edit ADDS to a model, as opposed to the `W += Δ` changes of a `ParamDelta`.

A `SideModule` is a declared module type (a name from `MODULE_TYPES`, factedit's own, never code read
from a file), the point it is attached at (the dotted name of a submodule whose output it changes,
e.g. "model.layers.20.mlp"), its tensors and a few JSON scalars (`options`). The model layer attaches it
as a forward hook on that point (model/weights.py); the hook sees the point's input x and output y,
both (B, T, d) with d the model's hidden size, and returns the new output.

Types:
    codebook       GRACE (Hartvigsen et al. 2023): keys (n, d), values (n, d), radii (n,). A position
                   whose input lies within a key's radius gets that key's value as output; when several
                   match, the entry attached last wins.
    gated_neurons  T-Patcher (Huang et al. 2023): w_in (n, d), b_in (n,), w_out (n, d); the output gains
                   relu(x w_inᵀ + b_in) w_out, non-zero only where a neuron fires.
    bottleneck     a Houlsby adapter (Houlsby et al. 2019) on the output: y + up(act(down y + b_down)) + b_up
                   with down (r, d), b_down (r,), up (d, r), b_up (d,); option "act": relu | gelu | silu.
    bias           a bias term on the output (BitFit, Ben Zaken et al. 2022, on models whose MLP has none):
                   y + bias, with bias (d,).

The functions are pure: the same modules on the same input give the same bits, however they were
made, which is what exact revert needs (the attached modules are a function of the active edits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InvalidDeltaError

Option = float | int | str | bool


@dataclass(frozen=True)
class SideModule:
    """One module an edit adds: `type` (a key of MODULE_TYPES), `point` (a submodule name), tensors."""

    type: str
    point: str
    tensors: Mapping[str, torch.Tensor]
    options: Mapping[str, Option] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", dict(self.tensors))
        object.__setattr__(self, "options", dict(self.options))
        module_type(self.type).check(self)

    def detached_cpu(self) -> SideModule:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        return SideModule(self.type, self.point, tensors, self.options)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def fro_norm(self) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.tensors.values()))

    def hidden_size(self) -> int:
        """d: the width of the point's input and output this module expects."""
        return module_type(self.type).hidden(self)

    def to(self, dtype: torch.dtype, device: torch.device | str) -> SideModule:
        """The module with its tensors in the model's dtype and device (checked when built)."""
        return SideModule(self.type, self.point, {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()},
                          self.options)

    def describe(self) -> dict[str, object]:
        return {"type": self.type, "point": self.point, "options": dict(self.options),
                "shapes": {k: list(v.shape) for k, v in self.tensors.items()}}


@dataclass(frozen=True)
class ModuleType:
    """A declared module type: the tensors it needs with their shapes, its options, and its forward
    over a run of consecutive modules of this type at one point (so a codebook of many edits is one
    distance computation)."""

    name: str
    shapes: Mapping[str, tuple[str, ...]]  # tensor name -> dims by letter: "n"/"r" free, "d" hidden
    options: Mapping[str, tuple[Option, ...]]  # option -> allowed values (empty: any finite number)
    run: Callable[[Sequence[SideModule], torch.Tensor, torch.Tensor], torch.Tensor]

    def hidden(self, module: SideModule) -> int:
        for name, dims in self.shapes.items():
            if "d" in dims:
                return int(module.tensors[name].shape[dims.index("d")])
        raise InvalidDeltaError(f"module type {self.name} declares no hidden dimension")

    def check(self, module: SideModule) -> None:
        """Refuse missing or extra tensors, wrong ranks, inconsistent sizes, NaN/inf and bad options."""
        where = f"side module {module.type!r} at {module.point!r}"
        if not isinstance(module.point, str) or not module.point:
            raise InvalidDeltaError(f"{where}: its point must be a non-empty submodule name")
        if set(module.tensors) != set(self.shapes):
            raise InvalidDeltaError(f"{where}: needs tensors {sorted(self.shapes)}, got {sorted(module.tensors)}")
        sizes: dict[str, int] = {}
        for name, dims in self.shapes.items():
            tensor = module.tensors[name]
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != len(dims):
                raise InvalidDeltaError(f"{where}: {name} must be a floating tensor with dims {dims}")
            for letter, size in zip(dims, tensor.shape, strict=True):
                if sizes.setdefault(letter, int(size)) != size:
                    raise InvalidDeltaError(
                        f"{where}: {name} has shape {tuple(tensor.shape)}, inconsistent in {letter!r}")
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidDeltaError(f"{where}: {name} contains NaN or inf; nothing was applied")
        if any(size == 0 for size in sizes.values()):
            raise InvalidDeltaError(f"{where}: a dimension is empty")
        for key, value in module.options.items():
            if key not in self.options:
                raise InvalidDeltaError(f"{where}: unknown option {key!r}; known: {sorted(self.options)}")
            allowed = self.options[key]
            if allowed and value not in allowed:
                raise InvalidDeltaError(f"{where}: option {key}={value!r}; allowed: {list(allowed)}")


def _codebook(modules: Sequence[SideModule], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    keys = torch.cat([m.tensors["keys"] for m in modules])  # (N, d)
    values = torch.cat([m.tensors["values"] for m in modules])  # (N, d)
    radii = torch.cat([m.tensors["radii"] for m in modules])  # (N,)
    q = x.float()  # (B, T, d)
    k = keys.float()
    dist2 = (q.pow(2).sum(-1, keepdim=True) - 2 * q @ k.T + k.pow(2).sum(-1)).clamp_min(0)  # (B, T, N)
    inside = dist2 <= radii.float().pow(2)  # (B, T, N)
    # The last entry within its radius wins: argmax of index * inside (0 when none; `hit` says which).
    order = torch.arange(1, len(keys) + 1, device=x.device)  # (N,)
    last = (inside * order).argmax(-1)  # (B, T)
    hit = inside.any(-1, keepdim=True)  # (B, T, 1)
    return torch.where(hit, values[last].to(y.dtype), y)  # (B, T, d)


def _gated_neurons(modules: Sequence[SideModule], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    for m in modules:  # one after another: the same bits whichever edits are active around it
        t = m.tensors
        act = torch.relu(x @ t["w_in"].T + t["b_in"])  # (B, T, n)
        y = y + act @ t["w_out"]  # (B, T, d)
    return y


_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu,
}


def _bottleneck(modules: Sequence[SideModule], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    for m in modules:
        t = m.tensors
        hidden = _ACTS[str(m.options.get("act", "relu"))](y @ t["down"].T + t["b_down"])  # (B, T, r)
        y = y + hidden @ t["up"].T + t["b_up"]  # (B, T, d)
    return y


def _bias(modules: Sequence[SideModule], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    for m in modules:  # one add per edit, in order: the same bits whichever edits are active around it
        y = y + m.tensors["bias"]  # (B, T, d) + (d,)
    return y


MODULE_TYPES: Mapping[str, ModuleType] = {
    t.name: t
    for t in (
        ModuleType("codebook", {"keys": ("n", "d"), "values": ("n", "d"), "radii": ("n",)}, {}, _codebook),
        ModuleType("gated_neurons", {"w_in": ("n", "d"), "b_in": ("n",), "w_out": ("n", "d")}, {}, _gated_neurons),
        ModuleType("bottleneck", {"down": ("r", "d"), "b_down": ("r",), "up": ("d", "r"), "b_up": ("d",)},
                   {"act": tuple(_ACTS)}, _bottleneck),
        ModuleType("bias", {"bias": ("d",)}, {}, _bias),
    )
}


def module_type(name: str) -> ModuleType:
    """The declared type `name`; InvalidDeltaError listing the known ones otherwise."""
    if name not in MODULE_TYPES:
        raise InvalidDeltaError(f"unknown side module type {name!r}; factedit's types: {', '.join(MODULE_TYPES)}")
    return MODULE_TYPES[name]


def run_modules(modules: Sequence[SideModule], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The output `y` (B, T, d) of a point with `modules` (in attach order) applied, given its input `x`;
    each run of consecutive modules of one type goes through that type's forward together."""
    start = 0
    while start < len(modules):
        end = start
        while end < len(modules) and modules[end].type == modules[start].type:
            end += 1
        y = MODULE_TYPES[modules[start].type].run(modules[start:end], x, y)
        start = end
    return y


def prepared(modules: Sequence[SideModule], dtype: torch.dtype, device: torch.device | str) -> list[SideModule]:
    """`modules` in the model's dtype and device, each run of codebooks joined into one (their entries
    in order), so a thousand GRACE edits cost one distance computation per forward."""
    out: list[SideModule] = []
    for module in (m.to(dtype, device) for m in modules):
        if out and module.type == out[-1].type == "codebook":
            joined = {k: torch.cat([out[-1].tensors[k], module.tensors[k]]) for k in module.tensors}
            out[-1] = SideModule("codebook", module.point, joined)
        else:
            out.append(module)
    return out
