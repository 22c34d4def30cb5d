"""Preserving what an edit must not change: the null-space projection shared by every method.

An edited matrix maps keys k (its inputs) to values. Over a reference corpus the keys span a few
dominant directions; `null_space_basis` keeps the directions in which they have (almost) no energy:
eigenvectors of E[k kᵀ] whose eigenvalue is below `threshold` × the mean eigenvalue. P = Q Qᵀ
projects onto them. An update ΔW P (Linear layout; P ΔW for GPT-2 Conv1D) leaves the outputs on the
corpus keys unchanged up to their small residual energy (AlphaEdit, Fang et al. 2025).

- `project(delta)` applies P to any Delta on the input side: a low-rank delta stays low-rank
  (only the input-side factor changes, its rank is kept), a dense one stays dense. Fine-tuning editors
  also project their gradients (`project_tensor`) so the edit is fitted inside the null space.
- `solve_rows(keys, values)` is the least-squares update of AlphaEdit's closed form: the ΔW = Y P that
  maps each projected key to its value, with a ridge, and with the keys of earlier active edits held
  at zero change: Y = V (P K)ᵀ (P (K Kᵀ + K_p K_pᵀ) P + r I)^{-1}. MEND uses it to aggregate its
  per-token values (MALMEN, Tan et al. 2024, without the projection).
- Earlier edits' keys enter through `protect` / `release` (Woodbury updates of the inverse kept per
  matrix, in float64).
- `cov_weight` > 0 adds MEMIT's covariance term inside the null space: a threshold above zero keeps
  directions in which corpus keys still have some energy (λ_i), and the solve then also minimises
  what the update does to them, cov_weight · Σ_i λ_i ‖ΔW q_i‖², so it leans on the emptiest
  directions: the ridge becomes diagonal, r·e + cov_weight·λ_i. None weighs by each matrix's input
  width (`covariance_weight`), the same trade on every model.
- `covariance_solve_rows(C, keys, values, weight)` is MEMIT's least squares without a projection
  (Meng et al. 2023): the update that maps the keys to their values while weighing the corpus keys'
  outputs by `weight` (ΔW = V (K (weight C + KᵀK)^{-1})); weight 0 inserts the keys exactly with the
  smallest change in the C-norm (ROME's rank-one update for one key).

All of this is a transform of deltas before they are applied: the Editor still stores and reverts
exactly the delta it applied.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta, ParamDelta
from ..core.errors import ConfigError
from ..core.settable import Flag, Number, Settable
from ..model.specs import module_of, weight_layout
from .keys import cached_derivative, key_statistics
from .reference import key_corpus


@dataclass(frozen=True)
class PreserveConfig:
    """How edits are kept off the keys of the reference corpus (see the module docstring)."""

    # null space: eigenvalues of E[kkᵀ] below threshold × their mean. Above the largest (e.g. 1000): the
    # whole input space, for models with no null space; cov_weight then does the preserving (MEMIT's
    # covariance solve with earlier edits' keys held, docs/locate.md).
    threshold: float = 0.1
    ridge: float = 1.0  # r of solve_rows, × the mean projected energy of a corpus key
    protect_edits: bool = True  # earlier active edits' keys are held at zero change (solve_rows)
    # Weight of the corpus keys' outputs left in the null space (the corpus counts as this many keys);
    # 0 = AlphaEdit's plain ridge; None = each matrix's input width (covariance_weight).
    cov_weight: float | None = 0.0

    SETTABLE: ClassVar[Settable] = {"threshold": Number(1e-3, 1e4), "ridge": Number(1e-3, 1e3),
                                    "protect_edits": Flag(), "cov_weight": Number(0.0, 1e6, optional=True)}

    def __post_init__(self) -> None:
        if not self.threshold > 0 or not self.ridge > 0:
            raise ConfigError("preserve threshold and ridge must be > 0")
        if self.cov_weight is not None and not 0 <= self.cov_weight < float("inf"):
            raise ConfigError("preserve cov_weight must be a finite number >= 0, or None for the key width")


def covariance_weight(weight: float | None, width: int) -> float:
    """The covariance term's weight w for keys `width` wide: `weight`, or the width itself when None.

    For a key k of the corpus E[kᵀ C⁻¹ k] = tr(C⁻¹ C) = width, so with w = width a typical corpus key
    has kᵀ (w C)⁻¹ k = 1 on any model: the solve trades reach against the corpus alike whatever the
    MLP's width (MEMIT's 15000 for GPT-J's 16,384-wide keys is 0.92 × the width)."""
    return float(width) if weight is None else weight


def preserve_field(default: PreserveConfig | None) -> PreserveConfig | None:
    """A method config's `preserve` field: a PreserveConfig (or a mapping of its fields), None = off."""
    return field(default=default, metadata={"dataclass": PreserveConfig})


def null_space_basis(second_moment: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """(Q (in, m), e): orthonormal directions whose eigenvalue of `second_moment` (in, in) is below
    threshold × the mean eigenvalue, and the scale of the ridge: the mean energy a corpus key keeps in
    them (Σ of those eigenvalues), at least 1e-6 of its whole energy (an exact null space has none)."""
    eigenvalues, vectors = torch.linalg.eigh(second_moment.double())  # ascending
    eigenvalues = eigenvalues.clamp(min=0)
    keep = eigenvalues < threshold * eigenvalues.mean()
    if not bool(keep.any()):
        raise ConfigError(
            f"no null space at threshold {threshold}: every direction carries corpus keys; raise the threshold"
        )
    energy = max(float(eigenvalues[keep].sum()), 1e-6 * float(eigenvalues.sum()))
    return vectors[:, keep].contiguous(), energy


class KeyPreserver:
    """Null-space projections and the least-squares solve for a set of edited matrices.

    bases: parameter name -> (Q (in, m), mean projected key energy), from `null_space_basis`.
    layouts: parameter name -> "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D).
    energies: parameter name -> (m,) the corpus keys' energy along each of Q's directions (the
    eigenvalues of E[kkᵀ] there), needed when config.cov_weight > 0.
    """

    def __init__(
        self, bases: Mapping[str, tuple[torch.Tensor, float]], layouts: Mapping[str, str], config: PreserveConfig,
        energies: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = config
        self.layouts = dict(layouts)
        self.bases = {name: q for name, (q, _) in bases.items()}
        self.ridge = {name: config.ridge * energy for name, (_, energy) in bases.items()}
        weights = {name: covariance_weight(config.cov_weight, q.shape[0]) for name, q in self.bases.items()}
        if any(w > 0 for w in weights.values()) and (energies is None or not set(self.bases) <= set(energies)):
            raise ConfigError("preserve cov_weight > 0 needs the corpus energy along every null-space direction")
        # (m,) the covariance term's share of the diagonal ridge (zero without cov_weight)
        self._cov_diag = {name: (weights[name] * energies[name].double() if weights[name] > 0
                                 else torch.zeros(q.shape[1], dtype=torch.float64))
                          for name, q in self.bases.items()}
        # (m, m) inverse of Qᵀ K_pᵀ K_p Q + diag(r + cov) per matrix: earlier edits' keys in null-space
        # coordinates.
        self._inverse = {name: torch.diag(1.0 / (self.ridge[name] + self._cov_diag[name]))
                         for name in self.bases}
        self._protected: dict[str, dict[str, torch.Tensor]] = {}  # edit id -> {name: (N, m)}
        self._stale: set[str] = set()  # matrices whose inverse waits for a rebuild after a release
        self._converted: dict[tuple, torch.Tensor] = {}  # bases in the dtype/device a caller works in

    @classmethod
    def full_space(cls, widths: Mapping[str, int], layouts: Mapping[str, str], ridge: float) -> KeyPreserver:
        """A preserver that keeps nothing out: the whole input space, the plain ridge least squares
        ΔW = V Kᵀ (K Kᵀ + ridge·I)^{-1} (no reference corpus; widths: name -> input width)."""
        bases = {name: (torch.eye(width, dtype=torch.float64), 1.0) for name, width in widths.items()}
        return cls(bases, layouts, PreserveConfig(threshold=1.0, ridge=ridge, protect_edits=False))

    @property
    def names(self) -> list[str]:
        return list(self.bases)

    # --- projection -------------------------------------------------------------------------------
    def project_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A dense (param-shaped) tensor with its input side projected onto the null space (computed
        in float32 at least: a projection needs no more, and fine-tuners call it every step)."""
        dtype = torch.promote_types(tensor.dtype, torch.float32)
        q = self._basis(name, tensor.device, dtype)
        if self.layouts[name] == "in_out":  # Conv1D (in, out): P @ Δ
            return (q @ (q.T @ tensor.to(dtype))).to(tensor.dtype)
        return ((tensor.to(dtype) @ q) @ q.T).to(tensor.dtype)  # Linear (out, in): Δ @ P

    def _basis(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, str(device), dtype)
        if key not in self._converted:
            self._converted[key] = self.bases[name].to(device, dtype)
        return self._converted[key]

    def project(self, delta: Delta) -> Delta:
        """`delta` with every matrix this preserver covers projected on its input side."""
        params = {}
        for name, pd in delta.items():
            if name not in self.bases:
                params[name] = pd
            elif pd.dense is not None:
                params[name] = ParamDelta(dense=self.project_tensor(name, pd.dense))
            elif self.layouts[name] == "in_out":  # left (in, r) is the input side
                params[name] = ParamDelta(left=self.project_rows(name, pd.left.T).T.contiguous(), right=pd.right)
            else:  # right (r, in) is the input side
                params[name] = ParamDelta(left=pd.left, right=self.project_rows(name, pd.right))
        return Delta(params)

    def project_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows (n, in) of input-side vectors projected onto the null space: rows Q Qᵀ."""
        dtype = torch.promote_types(rows.dtype, torch.float32)
        q = self._basis(name, rows.device, dtype)
        return ((rows.to(dtype) @ q) @ q.T).to(rows.dtype).contiguous()

    # --- least squares ----------------------------------------------------------------------------
    def solve_rows(
        self, keys: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor], ridge: float | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> rows (X (N, in), V (N, out)) with ΔW = Σ_i v_i x_iᵀ the least-squares update
        (module docstring): every key k_i (N, in) mapped to its value v_i (N, out) as far as the
        null space, the ridge and the protected keys allow. Differentiable in the values.
        `ridge` replaces the config's for this solve (a smaller one lets the update reach further)."""
        out = {}
        for name, k in keys.items():
            v = values[name]
            q = self.bases[name].to(k.device, torch.float64)
            b_inv = self._inverse_at(name, ridge).to(k.device)
            z = k.detach().double() @ q  # (N, m): keys in null-space coordinates
            b_z = b_inv @ z.T  # (m, N)
            inner = torch.eye(z.shape[0], dtype=torch.float64, device=k.device) + z @ b_z  # (N, N)
            x = torch.linalg.solve(inner, b_z.T) @ q.T  # (N, in): rows of ((PKKᵀP + B)^{-1} P K)ᵀ
            out[name] = (x.to(v.dtype), v)
        return out

    # --- earlier edits ----------------------------------------------------------------------------
    def protect(self, edit_id: str, keys: Mapping[str, torch.Tensor], rebuilt: Collection[str] = ()) -> None:
        """Hold `keys` (name -> (N, in)) of an applied edit at zero change in later solves. For the
        matrices `rebuilt` names the inverse is not updated but left to be rebuilt from every held key
        when next needed, as after a `release`: how a preserver that released an edit since stands, for
        one built later to hold the same inverse (safeguards.py)."""
        if not self.config.protect_edits:
            return
        coords = {name: k.detach().cpu().double() @ self.bases[name] for name, k in keys.items() if name in self.bases}
        for name, z in coords.items():
            if name in rebuilt:
                self._stale.add(name)
            else:
                self._inverse[name] = _woodbury(self._current_inverse(name), z)
        self._protected[edit_id] = coords

    def release(self, edit_id: str) -> None:
        """Stop protecting a reverted edit's keys. The inverse is rebuilt from the edits still
        protected (a Woodbury downdate loses precision when the ridge is small) when it is next
        needed, so a revert costs nothing here and reverting many edits rebuilds it once."""
        self._stale |= set(self._protected.pop(edit_id, {}))

    def _current_inverse(self, name: str) -> torch.Tensor:
        """(m, m) inverse at the config's ridge, rebuilt first if a release left it stale."""
        if name in self._stale:
            self._inverse[name] = self._gram_inverse(name, self.ridge[name])
            self._stale.discard(name)
        return self._inverse[name]

    def _inverse_at(self, name: str, ridge: float | None) -> torch.Tensor:
        """(m, m) inverse of the protected keys' Gram matrix plus the ridge (the config's when None)."""
        if ridge is None or ridge == self.config.ridge:
            return self._current_inverse(name)
        energy = self.ridge[name] / self.config.ridge  # the mean projected energy of a corpus key
        return self._gram_inverse(name, ridge * energy)

    def _gram_inverse(self, name: str, scaled_ridge: float) -> torch.Tensor:
        """(m, m) inverse of `_gram`. With no key held it is diagonal: its reciprocal, the inverse a new
        preserver starts from (an edit made then reverted costs no inversion, and leaves the state of a
        fresh one). Else by Cholesky (the Gram matrix is positive definite): half an LU inverse's work,
        which for the whole 1,536-wide space was a fifth of an edit-then-revert."""
        gram = self._gram(name, scaled_ridge)
        if not any(name in coords for coords in self._protected.values()):
            return torch.diag(1.0 / gram.diagonal())
        return torch.cholesky_inverse(torch.linalg.cholesky(gram))

    def _gram(self, name: str, scaled_ridge: float) -> torch.Tensor:
        """(m, m) Gram matrix of the protected keys in null-space coordinates, plus the diagonal
        ridge: scaled_ridge + the covariance term."""
        gram = torch.diag(scaled_ridge + self._cov_diag[name])
        for coords in self._protected.values():
            if name in coords:
                gram += coords[name].T @ coords[name]
        return gram

    def protected_edits(self) -> list[str]:
        return list(self._protected)


def covariance_solve_rows(
    second_moment: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (X (N, in), V (N, out)), ΔW = Σ_i v_i x_iᵀ, minimising Σ_i ‖ΔW k_i − v_i‖² + weight · tr(ΔW C ΔWᵀ)
    for keys K (N, in), values V (N, out) and the corpus keys' second moment C = E[k kᵀ] (in, in):
    X = K (weight C + KᵀK)^{-1} = (weight I + K C^{-1} Kᵀ)^{-1} K C^{-1} (Woodbury; an N × N solve).
    weight 0: every key is mapped exactly to its value (ROME, one key: ΔW = v (C^{-1}k)ᵀ / kᵀC^{-1}k).
    Computed in float64; C gets a ridge of 1e-6 of its mean eigenvalue so it is invertible."""
    if not weight >= 0:
        raise ConfigError(f"the covariance weight must be >= 0, got {weight}")
    c = second_moment.to(keys.device, torch.float64)
    c = c + torch.eye(c.shape[0], dtype=torch.float64, device=c.device) * 1e-6 * float(c.diagonal().mean())
    k = keys.detach().double()  # (N, in)
    c_inv_k = torch.linalg.solve(c, k.T)  # (in, N): C^{-1} Kᵀ
    gram = k @ c_inv_k + weight * torch.eye(k.shape[0], dtype=torch.float64, device=k.device)  # (N, N)
    x = torch.linalg.solve(gram, c_inv_k.T)  # (N, in)
    return x.to(values.dtype), values


def _woodbury(inverse: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(B + zᵀz)^{-1} from B^{-1} (m, m) and rows z (N, m): B^{-1} − W Wᵀ with W = B^{-1}zᵀ L^{-ᵀ}, where
    L Lᵀ = I + z B^{-1} zᵀ. One addmm writes the (m, m) result: W Wᵀ is symmetric by its form (entries
    (i, j) and (j, i) sum the same products), so it needs no averaging with its transpose, which with a
    solve in its place cost several (m, m) passes (a protected edit's main cost in float64 at m = 1,536)."""
    b_z = inverse @ z.T  # (m, N)
    inner = torch.eye(z.shape[0], dtype=torch.float64) + z @ b_z  # (N, N), positive definite
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(inner), b_z.T, upper=False)  # (N, m): L^{-1} (B^{-1}zᵀ)ᵀ
    return torch.addmm(inverse, w.T, w, alpha=-1)


def build_preserver(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    names: Sequence[str],
    config: PreserveConfig,
    *,
    fingerprint: str,
    model_id: str,
    base_params: Mapping[str, torch.Tensor] | None = None,
) -> KeyPreserver:
    """A KeyPreserver for the weight matrices `names` of `model`, from the key statistics of the
    shipped reference corpus on the base weights (`base_params` hold base values of parameters that
    are already edited). Statistics and bases are cached (keys.py)."""
    modules = {name: module_of(name) for name in names}
    corpus = key_corpus()
    moments = key_statistics(model, tokenizer, sorted(set(modules.values())), corpus,
                             fingerprint=fingerprint, model_id=model_id, params=base_params)

    def basis(module: str) -> dict[str, torch.Tensor]:  # the eigendecomposition is cached too
        def compute() -> dict[str, torch.Tensor]:
            q, energy = null_space_basis(moments[module], config.threshold)
            along = ((q.T @ moments[module].double()) * q.T).sum(dim=1)  # (m,) diag(QᵀCQ): the eigenvalues kept
            return {"basis": q, "energy": torch.tensor(energy, dtype=torch.float64), "along": along}

        return cached_derivative(fingerprint, corpus, module, f"null-{config.threshold:g}", compute,
                                 required=("basis", "energy", "along"))

    cached = {name: basis(module) for name, module in modules.items()}
    bases = {name: (t["basis"], float(t["energy"])) for name, t in cached.items()}
    # the energies are kept beside the basis: for the whole 1,536-wide space diag(QᵀCQ) is most of
    # building a preserver (0.8 of 0.95 s for five blocks), which every new Editor does
    energies = {name: t["along"] for name, t in cached.items()} if config.cov_weight != 0 else None
    return KeyPreserver(bases, {name: weight_layout(model, name) for name in names}, config, energies)
