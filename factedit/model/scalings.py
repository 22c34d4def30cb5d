"""Vector scalings that fold exactly into a weight matrix: what (IA)³ learns (Liu et al. 2022).

Two kinds, both a product of the weight with a vector along one of its axes:
    side "in"   the matrix's INPUT features scaled: W (l ⊙ h) = (W diag(l)) h. The MLP's intermediate
                activation h is the input of its down projection, so (IA)³'s feed-forward vector folds
                into the down projection's columns (Linear (out, in)) or rows (GPT-2 Conv1D (in, out)).
                A bias is added after the product and stays as it is.
    side "out"  some OUTPUT features scaled: l ⊙ (W x + b) = (diag(l) W) x + l ⊙ b. Keys and values are
                outputs of their projection (or a fixed part of a fused qkv matrix: attention.py), so
                their vectors fold into those rows (columns for Conv1D) and the matching bias entries.

Both agree with PEFT's IA³ layers (feed-forward modules scale their input, the others their output), which
is what lets an (IA)³ edit export as a PEFT IA³ adapter (artifacts/peft_ia3.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.errors import ConfigError
from .attention import KV, kv_projection
from .specs import mlp_module_name, resolve_layers, weight_layout

__all__ = ["IA3_TARGETS", "Scaling", "ia3_scalings"]

IA3_TARGETS = ("mlp", "k", "v")  # what (IA)³ scales: the MLP's intermediate activation, keys, values


@dataclass(frozen=True)
class Scaling:
    """One learned vector l (`size` entries) and the matrix it folds into (module docstring)."""

    module: str  # full module name, e.g. "model.layers.8.mlp.down_proj"
    side: Literal["in", "out"]
    features: torch.Tensor | None  # (size,) long: the output features scaled (side "out"); None: all
    size: int
    conv1d: bool  # GPT-2 Conv1D: the weight is stored (in, out)
    has_bias: bool

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias(self) -> str | None:
        """The bias the vector scales too (side "out" only), or None."""
        return f"{self.module}.bias" if self.has_bias and self.side == "out" else None

    def param_names(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])

    @property
    def axis(self) -> int:
        """The weight dimension the vector runs along: input features are dim 1 of a Linear, 0 of a Conv1D."""
        return (1 if self.side == "in" else 0) ^ int(self.conv1d)

    def full(self, scale: torch.Tensor, length: int) -> torch.Tensor:
        """The factor over the whole axis (`length` entries): `scale` at the scaled features, 1 elsewhere."""
        if self.features is None:
            return scale
        return torch.ones(length, dtype=scale.dtype, device=scale.device).index_copy(
            0, self.features.to(scale.device), scale)

    def fold(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`weight` with the vector folded in (same layout); unscaled entries stay bit for bit."""
        factor = self.full(scale, weight.shape[self.axis])
        return weight * (factor[:, None] if self.axis == 0 else factor[None, :])

    def fold_bias(self, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The bias with the vector folded in (side "out": its entries are outputs too)."""
        return bias * self.full(scale, bias.shape[0])


def _mlp_scaling(model: nn.Module, layer: int) -> Scaling:
    module = mlp_module_name(model, layer, "out")
    conv1d = weight_layout(model, f"{module}.weight") == "in_out"
    weight = model.get_submodule(module).weight
    size = int(weight.shape[0] if conv1d else weight.shape[1])  # the intermediate width
    return Scaling(module, "in", None, size, conv1d, getattr(model.get_submodule(module), "bias", None) is not None)


def _kv_scaling(model: nn.Module, layer: int, targets: Sequence[str]) -> list[Scaling]:
    """The k and/or v scalings of a block; one vector over both where they share a fused module."""
    projections = [kv_projection(model, layer, which) for which in KV if which in targets]
    if len(projections) == 2 and projections[0].module == projections[1].module:
        k, v = projections
        features = torch.cat([k.features, v.features])  # (2n,) k's entries first, then v's
        return [Scaling(k.module, "out", features, k.width + v.width, k.conv1d, k.has_bias)]
    return [Scaling(p.module, "out", p.features, p.width, p.conv1d, p.has_bias) for p in projections]


def ia3_scalings(model: nn.Module, layers: Sequence[int], targets: Sequence[str]) -> list[Scaling]:
    """The (IA)³ vectors of `targets` (from IA3_TARGETS) in each of `layers`, ordered by layer then target."""
    unknown = sorted(set(targets) - set(IA3_TARGETS))
    if unknown or not targets:
        raise ConfigError(f"(IA)³ targets must be some of {', '.join(IA3_TARGETS)}; got {list(targets)!r}")
    out: list[Scaling] = []
    for layer in resolve_layers(model, layers):
        if "mlp" in targets:
            out.append(_mlp_scaling(model, layer))
        if "k" in targets or "v" in targets:
            out += _kv_scaling(model, layer, targets)
    return out
