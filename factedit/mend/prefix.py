"""A training-speed cache: the hidden states entering the first edited block, per token sequence.

The base model is frozen during MEND training and only blocks >= `start` are edited, so the blocks
below `start` compute the same thing for a sequence every time it is seen. `PrefixCache` computes
them once (a forward that stops at block `start`) and afterwards, inside `skipping(...)`, turns the
blocks below `start` into pass-throughs and feeds the cached states into block `start`: a forward
then costs the embedding lookup, the edited blocks and the head. The forward patches and hooks are
removed on exit, also on error; no parameter is touched.

Block outputs must be plain tensors (true for the transformers 5 families in the ModelSpec registry).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.atomic import atomic_path
from ..model.specs import resolve_layers, spec_for
from ..scoring.sequences import pad_sequences

Ids = tuple[int, ...]


class _Stop(Exception):
    """Raised by the hook that ends a prefix forward at block `start`."""


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class PrefixCache:
    """Hidden states (T, d) entering block `start`, keyed by token ids (see module docstring)."""

    def __init__(self, model: nn.Module, start: int, batch_size: int = 16) -> None:
        (self.start,) = resolve_layers(model, (start,))
        self.prefix = f"{spec_for(model).layers_path}"
        self.batch_size = batch_size
        self.store: dict[Ids, torch.Tensor] = {}

    def save(self, path: str | Path, tag: str) -> None:
        """Write the cached states to a safetensors file (keys are the comma-joined token ids)."""
        tensors = {",".join(map(str, ids)): h.detach().cpu().contiguous() for ids, h in self.store.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"tag": tag, "start": str(self.start)})

    def load(self, path: str | Path, tag: str, device: torch.device | str = "cpu") -> int:
        """Add the states of a file written by `save` with the same `tag` (the base model's anchor
        fingerprint) and start block, onto `device` (the model's: `fill` computes there); returns how
        many were added (0 when the file does not fit)."""
        path = Path(path)
        if not path.is_file():
            return 0
        with safe_open(str(path), "pt", device=str(device)) as handle:
            meta = handle.metadata() or {}
            if meta.get("tag") != tag or meta.get("start") != str(self.start):
                return 0
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self.store[tuple(int(x) for x in key.split(","))] = handle.get_tensor(key)
        return len(self.store)

    def _block(self, model: nn.Module, index: int) -> nn.Module:
        return model.get_submodule(f"{self.prefix}.{index}")

    def _keep(self, hidden: torch.Tensor, sequences: Sequence[Ids]) -> None:
        """Store each row's states (T_i, d) from right-padded `hidden` (B, T, d)."""
        for row, seq in enumerate(sequences):
            self.store[tuple(seq)] = hidden[row, : len(seq)].clone()

    @torch.no_grad()
    def fill(self, model: nn.Module, sequences: Sequence[Ids], pad_id: int) -> None:
        """Compute the states of the sequences not cached yet (model frozen, no gradients)."""
        missing = list(dict.fromkeys(s for s in sequences if s not in self.store))
        device = next(model.parameters()).device
        for begin in range(0, len(missing), self.batch_size):
            chunk = missing[begin : begin + self.batch_size]
            ids, mask = pad_sequences(chunk, pad_id)
            seen: dict[str, torch.Tensor] = {}

            def stop(module: nn.Module, args: tuple, kwargs: dict, seen: dict = seen) -> None:
                seen["h"] = _hidden_arg(args, kwargs).detach()  # (B, T, d)
                raise _Stop

            block = self._block(model, self.start)
            handle = block.register_forward_pre_hook(stop, with_kwargs=True)
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
            except _Stop:
                pass
            finally:
                handle.remove()
            self._keep(seen["h"], chunk)

    @contextlib.contextmanager
    def recording(self, model: nn.Module, sequences: Sequence[Ids]) -> Iterator[None]:
        """Inside: a forward of exactly these right-padded rows also stores their states entering
        block `start` (a forward the caller runs anyway fills the cache for free)."""

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._keep(_hidden_arg(args, kwargs).detach(), sequences)

        handle = self._block(model, self.start).register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def skipping(self, model: nn.Module, sequences: Sequence[Ids], pad_id: int) -> Iterator[None]:
        """Inside: a forward of exactly these right-padded rows runs only blocks >= start."""
        self.fill(model, sequences, pad_id)
        width = max(len(s) for s in sequences)
        states = [self.store[s] for s in sequences]
        hidden = torch.zeros(len(states), width, states[0].shape[-1], dtype=states[0].dtype,
                             device=states[0].device)  # (B, T, d)
        for row, h in enumerate(states):
            hidden[row, : h.shape[0]] = h

        def inject(module: nn.Module, args: tuple, kwargs: dict):
            if args:
                return (hidden.to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

        skipped = [self._block(model, i) for i in range(self.start)]
        handle = self._block(model, self.start).register_forward_pre_hook(inject, with_kwargs=True)
        try:
            for block in skipped:
                block.forward = _pass_through  # instance attribute shadows the class's forward
            yield
        finally:
            handle.remove()
            for block in skipped:
                block.__dict__.pop("forward", None)


def _pass_through(hidden_states: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
    return hidden_states if hidden_states is not None else kwargs["hidden_states"]
