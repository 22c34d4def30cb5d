"""Deltas: what an edit method computed, per parameter, before anything touches the weights.

A `Delta` maps parameter names to `ParamDelta`s, each either a dense tensor shaped like the parameter
or low-rank factors `left @ right` in the parameter's own layout (so the Editor never needs to know
about Conv1D orientation). Entries carry a `kind` so editors that add modules (adapters, codebooks)
can join later without changing the journal format.

An edit may also ADD modules (`modules`: name -> `SideModule`, core/side.py): adapters, gated neurons,
a codebook, attached by forward hooks at named points of the model. A delta may hold only those.
Serialised, their tensors are `side/<name>::<tensor>` and their declaration (type, point, options) is the
JSON metadata `side` (with `side_format`); a blob without them reads as before, so older journals and
exported edits keep working, and a blob with them names no code, only a type from factedit's registry.

Low-rank factors are materialised in float64 on the CPU and then rounded to the parameter's dtype:
the rounding absorbs differences in BLAS summation order, so replaying an edit in another process
gives the same bits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import InvalidDeltaError
from .side import SideModule

DENSE = "dense"
LOW_RANK = "low_rank"
_FORMAT = "factedit.delta/1"
SIDE_FORMAT = "factedit.side/1"


@dataclass(frozen=True)
class ParamDelta:
    """The change to one parameter: `dense`, or `left @ right` (rank = left.shape[1])."""

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None  # (rows, r) in the parameter's layout
    right: torch.Tensor | None = None  # (r, cols)

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.left is None or self.right is None):
            raise InvalidDeltaError("a ParamDelta is either dense or a pair of low-rank factors")
        if self.left is not None and (
            self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[0]
        ):
            raise InvalidDeltaError(
                f"low-rank factors must be (rows, r) and (r, cols); got {tuple(self.left.shape)} "
                f"and {tuple(self.right.shape)}"
            )

    @property
    def kind(self) -> str:
        return DENSE if self.dense is not None else LOW_RANK

    @property
    def shape(self) -> torch.Size:
        if self.dense is not None:
            return self.dense.shape
        return torch.Size((self.left.shape[0], self.right.shape[1]))

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.dense is not None:
            return {"dense": self.dense}
        return {"left": self.left, "right": self.right}

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors().values())

    def materialize(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense change in `dtype` on `device` (deterministic, see the module docstring)."""
        if self.dense is not None:
            return self.dense.to(device=device, dtype=dtype)
        product = self.left.detach().cpu().double() @ self.right.detach().cpu().double()  # (rows, cols)
        return product.to(dtype=dtype).to(device)

    def detached_cpu(self) -> ParamDelta:
        return ParamDelta(**{k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()})

    @classmethod
    def from_lora(cls, a: torch.Tensor, b: torch.Tensor, layout: str) -> ParamDelta:
        """The change B·A of a LoRA pair as peft stores it (A (r, in), B (out, r), the scaling folded into
        B) as factors in the weight's layout: Linear (out, in) = B @ A; GPT-2's Conv1D (in, out) = Aᵀ @ Bᵀ."""
        if layout == "in_out":
            return cls(left=a.T.contiguous(), right=b.T.contiguous())  # (in, r), (r, out)
        return cls(left=b.contiguous(), right=a.contiguous())  # (out, r), (r, in)

    def lora_pair(self, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as peft stores them, (r, in) and (out, r), with B·A this change: `from_lora`'s inverse."""
        if self.dense is not None:
            raise InvalidDeltaError("a dense change has no LoRA pair; factor it first")
        if layout == "in_out":
            return self.left.T, self.right.T
        return self.right, self.left


@dataclass(frozen=True)
class Delta:
    """A whole edit's change: parameter name -> ParamDelta, in a fixed order, and the side modules it
    adds (name -> SideModule, attached in this order after those of earlier edits)."""

    params: Mapping[str, ParamDelta]
    modules: Mapping[str, SideModule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.params and not self.modules:
            raise InvalidDeltaError("a delta must change at least one parameter or add a side module")
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "modules", dict(self.modules))
        for name, module in self.modules.items():
            if not isinstance(module, SideModule) or not name or "::" in name or "/" in name:
                raise InvalidDeltaError(f"side module {name!r}: expected a SideModule under a plain name")

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def items(self):
        return self.params.items()

    def names(self) -> list[str]:
        return list(self.params)

    def detached_cpu(self) -> Delta:
        return Delta({name: p.detached_cpu() for name, p in self.params.items()},
                     {name: m.detached_cpu() for name, m in self.modules.items()})

    def num_bytes(self) -> int:
        tensors = [t for p in self.params.values() for t in p.tensors().values()]
        tensors += [t for m in self.modules.values() for t in m.tensors.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def check_against(self, named_params: Mapping[str, torch.nn.Parameter]) -> None:
        """Refuse a delta that names unknown parameters, has the wrong shape, or holds NaN/inf."""
        for name, pdelta in self.params.items():
            if name not in named_params:
                raise InvalidDeltaError(f"the delta changes {name!r}, which the model does not have")
            if tuple(pdelta.shape) != tuple(named_params[name].shape):
                raise InvalidDeltaError(
                    f"the delta for {name!r} has shape {tuple(pdelta.shape)}, the parameter "
                    f"{tuple(named_params[name].shape)}"
                )
            if not pdelta.is_finite():
                raise InvalidDeltaError(f"the delta for {name!r} contains NaN or inf; nothing was applied")

    # --- serialisation: safetensors bytes, never pickle -------------------------------------------
    def to_bytes(self, metadata: Mapping[str, str] | None = None) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        layout = {}
        for name, pdelta in self.params.items():
            layout[name] = pdelta.kind
            for part, tensor in pdelta.tensors().items():
                tensors[f"{name}::{part}"] = tensor.detach().cpu().contiguous()
        meta = {"format": _FORMAT, "layout": json.dumps(layout)}
        if self.modules:
            side = {}
            for name, module in self.modules.items():
                side[name] = {"type": module.type, "point": module.point, "options": dict(module.options)}
                for part, tensor in module.tensors.items():
                    tensors[f"side/{name}::{part}"] = tensor.detach().cpu().contiguous()
            meta.update({"side_format": SIDE_FORMAT, "side": json.dumps(side)})
        meta.update(metadata or {})
        return save_safetensors(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> Delta:
        """The delta `to_bytes` wrote; InvalidDeltaError for anything else (checked header first)."""
        metadata = delta_metadata(data)
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors' own error types: a malformed blob either way
            raise InvalidDeltaError(f"not a safetensors blob: {exc}") from None
        try:
            layout = json.loads(metadata.get("layout", "{}"))
        except ValueError:
            raise InvalidDeltaError("not a factedit delta: its layout is not JSON") from None
        if not isinstance(layout, dict) or not all(isinstance(k, str) for k in layout.values()):
            raise InvalidDeltaError("not a factedit delta: its layout is not an object of parameter names")
        modules = _side_modules(metadata, tensors)
        if not layout and not modules:
            raise InvalidDeltaError("not a factedit delta: its safetensors metadata has no layout")
        params = {}
        for name, kind in layout.items():
            parts = ("dense",) if kind == DENSE else ("left", "right")
            try:
                params[name] = ParamDelta(**{p: tensors[f"{name}::{p}"] for p in parts})
            except KeyError as exc:
                raise InvalidDeltaError(f"the delta for {name!r} lacks its {exc.args[0]!r} tensor") from None
        return cls(params, modules)


def _side_modules(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, SideModule]:
    """The side modules a blob declares (none when it has no `side` metadata: an older blob), each built
    and so checked against its declared type; InvalidDeltaError for an unknown format or a bad entry."""
    if "side" not in metadata:
        return {}
    if metadata.get("side_format") != SIDE_FORMAT:
        raise InvalidDeltaError(f"side modules in format {metadata.get('side_format')!r}; this factedit reads "
                                f"{SIDE_FORMAT} (a newer factedit wrote it?)")
    try:
        side = json.loads(metadata["side"])
    except ValueError:
        raise InvalidDeltaError("not a factedit delta: its side modules are not JSON") from None
    if not isinstance(side, dict):
        raise InvalidDeltaError("not a factedit delta: its side modules are not an object")
    modules = {}
    for name, decl in side.items():
        if not isinstance(decl, dict) or not isinstance(decl.get("options", {}), dict):
            raise InvalidDeltaError(f"side module {name!r}: its declaration is not an object")
        prefix = f"side/{name}::"
        parts = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
        modules[name] = SideModule(str(decl.get("type")), str(decl.get("point", "")), parts, decl.get("options", {}))
    return modules


def delta_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors blob (its JSON header), without loading tensors."""
    if len(data) < 8:
        raise InvalidDeltaError("not a safetensors blob: too short")
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError):
        raise InvalidDeltaError("not a safetensors blob: unreadable header") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidDeltaError("not a safetensors blob: its header is not an object of string metadata")
    return dict(metadata)
