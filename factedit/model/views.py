"""Ways to read a model without touching it.

`read_view`: a second module tree over the very same parameter and buffer tensors.

Work that swaps weights in through `functional_call`, adds hooks or injects modules (a preview, a diff,
an edit's effect) changes the module tree it runs on for as long as it runs. On a view, a generation
running on the model meanwhile sees none of it, so that work can hold the weights shared, as readers
do, instead of alone. A view shares every tensor (nothing is copied but the modules, ~30 ms for the
default model) and is meant for one computation: make a fresh one each time.

`FunctionalModel`: a model called with some parameters replaced (functional_call), e.g. the weights
without one edit, for scoring.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..core.errors import ConfigError

_VIEW_OF = "factedit_view_of"


def read_view(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are `model`'s own tensor objects."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    object.__setattr__(view, _VIEW_OF, weakref.ref(model))  # not a submodule: a plain attribute
    return view


def viewed_model(model: nn.Module) -> nn.Module:
    """The model `model` is a read view of, or `model` itself when it is no view."""
    source = getattr(model, _VIEW_OF, None)
    if source is None:
        return model
    target = source()
    if target is None:
        raise ConfigError("this read view outlived its model")
    return target


def is_view(model: nn.Module) -> bool:
    return getattr(model, _VIEW_OF, None) is not None


class FunctionalModel(nn.Module):
    """`model` with some parameters replaced, through functional_call (the model is not touched)."""

    def __init__(self, model: nn.Module, replaced: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._model = [model]  # a list, so the model is not registered as a submodule
        self._replaced = replaced

    def parameters(self, recurse: bool = True):
        return self._model[0].parameters(recurse)

    def forward(self, **kwargs: Any):
        return functional_call(self._model[0], self._replaced, args=(), kwargs=kwargs)
