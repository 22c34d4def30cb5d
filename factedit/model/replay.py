"""Forward passes that start at a transformer block, from that block's cached input.

The hidden states entering block L depend only on the input ids and the weights below L. While an
Editor has touched nothing below L (edits write MLP matrices of chosen blocks only), the input of L
computed once stays valid, and a later pass need only run blocks L.. and the head: for `mend`, which
edits the last 3 of 30 blocks of the default model, a guard read costs about a third of a full pass.

    with capture_block_input(model, 27) as captured:
        model(input_ids=ids, attention_mask=mask)          # a full pass
    with start_at_block(model, 27, captured.hidden, captured.form):
        model(input_ids=ids, attention_mask=mask)          # blocks 0..26 not run; same logits

`start_at_block` swaps blocks 0..L-1 for stand-ins without parameters that return the cached states in
the form a block returns (a tensor, or a tuple whose first item is the hidden states, the rest None);
the swap is undone when the block exits, also on error. Callers check a replayed result against a full
pass once per model and layer (the drift guard does), so an architecture whose blocks pass more than
the hidden states between them is caught, not trusted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hooks import forward_hooks, stop_after
from .specs import blocks, spec_for

BlockForm = int | None  # how a block returns: None, a tensor; n, a tuple of n items, hidden states first


@dataclass
class CapturedInput:
    """What `capture_block_input` recorded in the last forward pass."""

    hidden: torch.Tensor | None = None  # (B, T, H): the input of block L, detached
    form: BlockForm | str = "unknown"  # the output form of block L-1 ("unknown": L is 0, or no hidden states)


def _form_of(output: object) -> BlockForm | str:
    if isinstance(output, torch.Tensor):
        return None
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return len(output)  # the rest (attention weights, a cache) is replayed as None
    return "unknown"


@contextlib.contextmanager
def capture_block_input(model: nn.Module, layer: int) -> Iterator[CapturedInput]:
    """Record the hidden states entering block `layer` (and how block `layer - 1` returns them)."""
    captured = CapturedInput()
    prefix = spec_for(model).layers_path

    def take_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        captured.hidden = hidden.detach() if isinstance(hidden, torch.Tensor) else None

    def take_form(module: nn.Module, args: tuple, output: object) -> None:
        captured.form = _form_of(output)

    handle = blocks(model)[layer].register_forward_pre_hook(take_input, with_kwargs=True)
    try:
        with forward_hooks(model, hooks={f"{prefix}.{layer - 1}": take_form} if layer > 0 else {}):
            yield captured
    finally:
        handle.remove()


class _StandIn(nn.Module):
    """Takes a block's place for one pass: returns the cached hidden states in the block's form.
    Attributes the model's loop reads from its blocks (attention type, layer index) come from the
    block it stands for."""

    def __init__(self, block: nn.Module, output: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not registered: a stand-in has no parameters
        object.__setattr__(self, "_output", output)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_block"), name)


@contextlib.contextmanager
def start_at_block(model: nn.Module, layer: int, hidden: torch.Tensor, form: BlockForm) -> Iterator[None]:
    """Inside the block, a forward pass of `model` skips blocks 0..layer-1: block `layer` receives
    `hidden` (B, T, H), which must be what those blocks give for the same input ids and mask."""
    if layer < 1:
        raise ValueError(f"a pass can start at block 1 or above, not {layer}")
    output = hidden if form is None else (hidden, *([None] * (form - 1)))
    modules = blocks(model)
    originals = [modules[i] for i in range(layer)]
    try:
        for i, block in enumerate(originals):
            modules[i] = _StandIn(block, output)
        yield
    finally:
        for i, block in enumerate(originals):
            modules[i] = block


@contextlib.contextmanager
def skip_frozen_blocks(model: nn.Module, layer: int, inputs: Mapping[str, torch.Tensor]) -> Iterator[bool]:
    """Inside the block, forward passes of `model` on `inputs` (the very same ids and mask each time) start
    at block `layer`: blocks 0..layer-1 run once here, without gradients, and their output stands in for
    them. Only for loops that train nothing below `layer` (the fine-tuning editors: about a quarter of each
    step's forward pass on the default model, blocks 0-7 of 30). Yields whether blocks are skipped: not
    for layer 0, nor where block layer-1's output form is unknown (then every pass runs in full)."""
    if layer < 1:
        yield False
        return
    with torch.no_grad(), capture_block_input(model, layer) as captured, \
            stop_after(model, f"{spec_for(model).layers_path}.{layer}"):
        model(**inputs)  # blocks 0..layer: the pass ends after block `layer`, its input kept
    if captured.hidden is None or captured.form == "unknown":
        yield False
        return
    with start_at_block(model, layer, captured.hidden, captured.form):
        yield True
