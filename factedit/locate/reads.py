"""Reads at the subject's last token: the inputs of MLP matrices (the keys) and a module's output
(where the value v* is measured: the edited block's output, or its down projection's for one block).

One forward pass over `Rows`, stopped after the highest block it needs. With `start` (the hidden
states entering a lower block, recorded by an earlier pass over the same rows) the blocks below it
are not run (replay.start_at_block): while an edit is spread over blocks L.., what enters L stays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model.hooks import capture_linear_io, forward_hooks, stop_after
from ..model.replay import CapturedInput, capture_block_input, start_at_block
from ..model.specs import spec_for
from ..scoring.positions import Rows


@dataclass(frozen=True)
class Start:
    """The hidden states entering block `layer` for a batch of rows (see the module docstring)."""

    layer: int
    captured: CapturedInput


def block_name(model: nn.Module, layer: int) -> str:
    return f"{spec_for(model).layers_path}.{layer}"


def block_hidden(output: object) -> torch.Tensor:
    """The hidden states (B, T, H) a block returns (alone, or first in a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]  # (B, T, H)


@contextlib.contextmanager
def started(model: nn.Module, start: Start | None):
    if start is None:
        yield
    else:
        with start_at_block(model, start.layer, start.captured.hidden, start.captured.form):
            yield


@torch.no_grad()
def read_at_subject(
    model: nn.Module, rows: Rows, modules: Sequence[str], output: str, *,
    params: Mapping[str, torch.Tensor] | None = None, start: Start | None = None, record: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, Start | None]:
    """({module: (B, in) its input at each row's subject token}, (B, H) the output of module `output`
    (a block, or an MLP matrix) there; the pass stops after that module;
    and, with `record` (a block index >= 1), the hidden states entering that block as a `Start`).
    `params` replace model tensors through functional_call (the model is not written)."""
    at = (torch.arange(rows.input_ids.shape[0], device=rows.input_ids.device), rows.subject)
    hidden: dict[str, torch.Tensor] = {}

    def take(module: nn.Module, args: tuple, output: object) -> None:
        hidden["h"] = block_hidden(output)[at].detach()

    name = output
    recording = capture_block_input(model, record) if record else contextlib.nullcontext(None)
    kwargs = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask}
    with capture_linear_io(model, modules, grads=False) as io, recording as captured, started(model, start), \
            forward_hooks(model, hooks={name: take}), stop_after(model, name):
        if params:
            torch.func.functional_call(model, dict(params), args=(), kwargs=kwargs, strict=False)
        else:
            model(**kwargs)
    keys = {m: io.inputs[m][at] for m in modules}
    return keys, hidden["h"], Start(record, captured) if record else None


def mean_by_owner(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """(n, d): the mean of the rows (B, d) of each owner."""
    total = torch.zeros(n, values.shape[1], dtype=values.dtype, device=values.device).index_add(0, owner, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, owner, torch.ones_like(owner,
                                                                                                        dtype=values.dtype))
    return total / count.clamp(min=1)[:, None]
