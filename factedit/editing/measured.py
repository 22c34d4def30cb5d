"""What a preview measured that applying its delta would measure again, and when it may stand in.

`Editor.preview` scores the requests with and without the delta and, with the drift guard on, reads
what the guard's next check would read with the delta added, and the keys key preservation would
protect. Applying that delta (`apply_preview`) would score the same sequences on the same weights
again (the record's `pre` and `post`), run the same guard reads and take the same keys: the
preview's figures are reused instead, but only while the weights are exactly
those they were measured on (`weights_token`) and the guard is the same; otherwise everything is
measured afresh, as for any edit. The guard still decides on the reused figures: a refusal changes
nothing and journals nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..safety.drift import GuardConfig


@dataclass(frozen=True)
class Measured:
    """A preview's figures for its delta, on the weights `weights` (a `weights_token`).

    pre, post: the record's before/after scores (`scoring.sequences.score_requests` form), computed from
        the very pairs and batches `score_requests` uses, so the record is what a direct edit records.
    drift: the guard's reading {group: ratio} with the delta added (`DriftGuard.read`); None: guard off.
    guard: the guard configuration it was read under.
    keys: the keys `Safeguards.protect` takes for the edit, read with the delta added.
    """

    weights: tuple[Any, ...]
    pre: Mapping[str, Any]
    post: Mapping[str, Any]
    drift: Mapping[int, float] | None
    guard: GuardConfig | None
    keys: Mapping[str, torch.Tensor] | None = None  # {param: (N, in)} the preserver would protect; None: none


def weights_token(model: nn.Module, fingerprint: str, active: Sequence[str]) -> tuple[Any, ...]:
    """Identity of the weights as they are now: the base model, the active edits, and each parameter's
    count of in-place writes (torch's version counter), so that any write since, by the Editor or by
    anyone else, makes a different token. Cheap: no tensor is read."""
    return (fingerprint, tuple(active), tuple(p._version for p in model.parameters()))


def reusable(
    measured: Measured | None, model: nn.Module, fingerprint: str, active: Sequence[str], guard: GuardConfig | None,
    score: bool,
) -> Measured | None:
    """`measured` if it was taken on the weights `model` has now (`weights_token`) under the same guard,
    else None; its scores copied (a record must not share them with the preview), or {} when the Editor
    does not score."""
    if measured is None or measured.weights != weights_token(model, fingerprint, active) or measured.guard != guard:
        return None
    if guard is not None and measured.drift is None:
        return None
    return dataclasses.replace(measured, pre=copy.deepcopy(dict(measured.pre)) if score else {},
                               post=copy.deepcopy(dict(measured.post)) if score else {})
