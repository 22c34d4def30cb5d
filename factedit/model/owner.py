"""The Editor that edits a model, as the model layer sees it: the weights it found when it bound the model.

An Editor marks the model it edits (`OWNER_ATTRIBUTE`: a weak reference to itself). What a method
derives from the model once and keeps for every later edit (the context prefixes the model writes,
contexts.py) is derived from these base weights, not from the weights as the edits so far left them:
so an Editor that reopens a journal, whose edits are replayed before it computes anything, derives
what the process that wrote the journal derived, and the edits do not leak into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .views import viewed_model

OWNER_ATTRIBUTE = "factedit_editor"  # set on a model: a weak reference to the Editor it belongs to


@dataclass(frozen=True)
class BaseWeights:
    """The weights an Editor found when it bound its model."""

    fingerprint: str  # model_fingerprint of them
    values: Mapping[str, torch.Tensor]  # the base values of the parameters its edits have touched (the rest are base)


class Owner(Protocol):
    def base_weights(self) -> BaseWeights: ...


def base_weights(model: nn.Module) -> BaseWeights | None:
    """The base weights of the Editor that edits `model` (or the model a read view is of); None when no
    Editor has bound it."""
    reference = getattr(viewed_model(model), OWNER_ATTRIBUTE, None)
    owner: Owner | None = reference() if reference is not None else None
    return owner.base_weights() if owner is not None else None
