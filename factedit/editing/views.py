"""A read view of a model: a second module tree over the very same parameter and buffer tensors.

Work that swaps weights in through `functional_call`, adds hooks or injects modules (a preview, a diff,
an edit's effect) changes the module tree it runs on for as long as it runs. On a view, a generation
running on the model meanwhile sees none of it, so that work can hold the weights shared, as readers
do, instead of alone. A view shares every tensor (nothing is copied but the modules, ~30 ms for the
default model) and is meant for one computation: make a fresh one each time.
"""

from __future__ import annotations

import copy
import itertools
import weakref

from torch import nn

from .errors import ConfigError

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
