"""The MEND editor network (Mitchell et al. 2022, section 3).

For each edited weight matrix the base model gives, per token t, its input u_t (d_in) and the
gradient δ_t at its output (d_out); the weight's gradient is Σ_t δ_t u_tᵀ. The editor maps each
pair to (ũ_t, δ̃_t) and the update is ΔW = −α Σ_t δ̃_t ũ_tᵀ, with α a learned step per matrix.

One `ShapeEditor` serves every edited matrix of one (d_in, d_out) shape. It

1. normalises z = [u; δ] with running mean/std statistics (Welford, kept as buffers so they are
   saved in the checkpoint; before any statistics exist it does not normalise),
2. applies a residual low-rank MLP: z ← z + act(s_l ⊙ (B A z + b) + h_l) per layer, where (s_l, h_l)
   is a learned scale and shift for the edited matrix l ("mode") and B starts at zero, so the network
   is exactly the identity at initialisation (the activation is ReLU on hidden layers, none on the
   last).

With identity initialisation, no statistics and α = 1 the update is exactly minus the gradient.

Aggregation: how the per-token outputs become one update of a matrix.
- "sum" (MEND): ΔW = Σ_t δ̃_t ũ_tᵀ.
- "least_squares" (MALMEN-style, inside AlphaEdit's null space): δ̃_t is the value the edited matrix
  should add at the token's own key u_t, and ΔW is the least-squares update that does so within the
  null space of the reference corpus's keys while holding earlier edits' keys
  (`KeyPreserver.solve_rows`). Updates then stay off ordinary text, which is what lets edits accumulate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

STD_EPS = 1e-7
AGGREGATIONS = ("sum", "least_squares")


@dataclass(frozen=True)
class EditedParam:
    """One edited weight matrix: its name, its u and δ widths, and its storage layout."""

    name: str
    d_in: int  # width of the module's input u
    d_out: int  # width of the module's output (and of δ)
    layout: str  # "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D)

    @property
    def shape_key(self) -> str:
        return f"{self.d_in}x{self.d_out}"


@dataclass(frozen=True)
class Stats:
    """Running mean/variance of the rows z = [u; δ] (D,), float64: count, mean, Σ (z - mean)².

    `merged` is Chan et al.'s parallel Welford update and returns new tensors (the old ones are not
    written), so a lifelong editor can keep the statistics an edit used beside its record.
    """

    count: torch.Tensor  # () float64
    mean: torch.Tensor  # (D,) float64
    m2: torch.Tensor  # (D,) float64

    @classmethod
    def empty(cls, dim: int) -> Stats:
        zeros = torch.zeros(dim, dtype=torch.float64)
        return cls(torch.zeros((), dtype=torch.float64), zeros, zeros.clone())

    def merged(self, z: torch.Tensor) -> Stats:
        """These statistics with the rows z (N, D) merged in."""
        if z.shape[0] == 0:
            return self
        z = z.detach().to(torch.float64)
        n_b = float(z.shape[0])
        mean_b = z.mean(0)  # (D,)
        m2_b = ((z - mean_b) ** 2).sum(0)  # (D,)
        n_a = float(self.count)
        total = n_a + n_b
        mean_a = self.mean.to(z.device)
        diff = mean_b - mean_a
        mean = mean_a + diff * (n_b / total)
        m2 = self.m2.to(z.device) + (m2_b + diff**2 * (n_a * n_b / total))
        return Stats(torch.tensor(total, dtype=torch.float64), mean.cpu(), m2.cpu())

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / std per column; the identity before two rows have been seen."""
        if float(self.count) < 2:
            return z
        std = (self.m2 / (self.count - 1)).sqrt()
        mean, std = self.mean.to(z.device, z.dtype), std.to(z.device, z.dtype)
        return (z - mean) / (std + STD_EPS)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.count": self.count.cpu(), f"{prefix}.mean": self.mean.cpu(), f"{prefix}.m2": self.m2.cpu()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> Stats:
        return cls(*(tensors[f"{prefix}.{part}"].to(torch.float64) for part in ("count", "mean", "m2")))


class LowRankResidual(nn.Module):
    """z + act(scale[mode] ⊙ (z Aᵀ Bᵀ + b) + shift[mode]); B = 0 at init, so the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int, activation: bool) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.down = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))  # A: (r, D)
        self.up = nn.Parameter(torch.zeros(dim, rank))  # B: (D, r)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.activation = activation

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        h = (z @ self.down.T) @ self.up.T + self.bias  # (N, D)
        h = h * self.scale[mode] + self.shift[mode]  # (N, D)
        if self.activation:
            h = h.clamp(min=0)
        return z + h


class ShapeEditor(nn.Module):
    """The editor shared by all edited matrices of one (d_in, d_out) shape."""

    def __init__(self, d_in: int, d_out: int, n_modes: int, rank: int, n_hidden: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))  # Σ (z - mean)²
        self.layers = nn.ModuleList(
            LowRankResidual(dim, rank, n_modes, activation=i < n_hidden) for i in range(n_hidden + 1)
        )

    @property
    def stats(self) -> Stats:
        """The running statistics held in the buffers (saved with the checkpoint)."""
        return Stats(self.count, self.mean, self.m2)

    @torch.no_grad()
    def update_stats(self, z: torch.Tensor) -> None:
        """Merge a batch of rows z (N, D) into the buffers' running statistics."""
        merged = self.stats.merged(z)
        self.count.copy_(merged.count)
        self.mean.copy_(merged.mean)
        self.m2.copy_(merged.m2)

    def forward(
        self, u: torch.Tensor, delta: torch.Tensor, mode: int, stats: Stats | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (N, d_in), δ: (N, d_out) -> (ũ, δ̃) of the same shapes.

        `stats` normalise instead of the buffers (lifelong editing passes the stream's own, already
        merged with these rows); the buffers are then neither read nor written."""
        z = torch.cat([u, delta], dim=-1).float()  # (N, D)
        if stats is None:
            if self.training:
                self.update_stats(z)
            stats = self.stats
        z = stats.normalise(z)
        for layer in self.layers:
            z = layer(z, mode)
        return z[:, : self.d_in], z[:, self.d_in :]


class MENDNetwork(nn.Module):
    """All shape editors of one base model plus a learned step size α per edited matrix.

    `forward` takes every edited matrix's factors at once (so data-parallel training wraps one call)
    and returns the transformed factors with −α folded into δ̃: the update of matrix l is
    Σ_t δ̃_t ũ_tᵀ in (out, in) terms.
    """

    def __init__(
        self, params: Sequence[EditedParam], rank: int, n_hidden: int, alpha_init: float, aggregation: str = "sum",
    ) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.params = tuple(params)
        self.rank, self.n_hidden, self.aggregation = rank, n_hidden, aggregation
        groups: dict[str, list[EditedParam]] = {}
        for p in self.params:
            groups.setdefault(p.shape_key, []).append(p)
        self.modes = {p.name: groups[p.shape_key].index(p) for p in self.params}
        self.editors = nn.ModuleDict(
            {
                key: ShapeEditor(ps[0].d_in, ps[0].d_out, len(ps), rank, n_hidden)
                for key, ps in groups.items()
            }
        )
        self.alpha = nn.Parameter(torch.full((len(self.params),), float(alpha_init)))

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def forward(
        self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], stats: Mapping[str, Stats] | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (u (N, d_in), δ (N, d_out)) to name -> (ũ (N, d_in), −α·δ̃ (N, d_out)).

        `stats` (shape key -> Stats, from `merged_stats`) normalise instead of the buffers."""
        out = {}
        for index, p in enumerate(self.params):
            u, delta = factors[p.name]
            own = stats[p.shape_key] if stats is not None else None
            u_t, d_t = self.editors[p.shape_key](u, delta, self.modes[p.name], own)
            out[p.name] = (u_t, d_t * -self.alpha[index])
        return out

    def stats(self) -> dict[str, Stats]:
        """shape key -> the statistics in the buffers (as trained)."""
        return {key: editor.stats for key, editor in self.editors.items()}

    def merged_stats(
        self, stats: Mapping[str, Stats], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, Stats]:
        """`stats` with every edited matrix's rows [u; δ] merged in, in parameter order (lifelong
        normalisation: the statistics keep learning from each edit)."""
        merged = dict(stats)
        for p in self.params:
            u, delta = factors[p.name]
            merged[p.shape_key] = merged[p.shape_key].merged(torch.cat([u, delta], dim=-1).float())
        return merged


def dense_update(u_t: torch.Tensor, d_t: torch.Tensor, layout: str) -> torch.Tensor:
    """The dense ΔW in the parameter's layout from rows ũ (N, d_in) and −α·δ̃ (N, d_out)."""
    if layout == "in_out":
        return u_t.T @ d_t  # (d_in, d_out)
    return d_t.T @ u_t  # (d_out, d_in)
