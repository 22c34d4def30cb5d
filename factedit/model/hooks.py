"""Forward hooks, only inside context managers that always remove them (design.md, invariant 6).

    with capture_linear_io(model, ["model.layers.29.mlp.down_proj"]) as io:
        loss = loss_fn(model(**batch).logits)
        loss.backward()
    io.inputs["model.layers.29.mlp.down_proj"]        # (B, T, d_in)  the module's input u
    io.output_grads["model.layers.29.mlp.down_proj"]  # (B, T, d_out) dLoss/d(output), δ

Every hook is removed when the block exits, also when it exits with an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

ForwardHook = Callable[[nn.Module, tuple, object], object]
ForwardPreHook = Callable[[nn.Module, tuple], object]


@contextlib.contextmanager
def forward_hooks(
    model: nn.Module,
    hooks: Mapping[str, ForwardHook] = {},
    pre_hooks: Mapping[str, ForwardPreHook] = {},
) -> Iterator[None]:
    """Register forward hooks / pre-hooks on named submodules for the duration of the block."""
    handles: list[RemovableHandle] = []
    try:
        for name, hook in pre_hooks.items():
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        for name, hook in hooks.items():
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by `stop_after`'s hook to end a forward pass once the modules of interest have run."""


@contextlib.contextmanager
def stop_after(model: nn.Module, module_name: str) -> Iterator[None]:
    """Inside the block, a forward pass of `model` ends (silently, without output) right after the
    module `module_name` has run: nothing above it is computed. Use it with hooks that record what
    the pass needs."""

    def stop(module: nn.Module, args: tuple, output: object) -> None:
        raise StopForward

    with forward_hooks(model, hooks={module_name: stop}), contextlib.suppress(StopForward):
        yield


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """No parameter requires grad and dropout is off inside the block; both are restored on exit,
    also on error (a method's compute leaves the model as it found it)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


@dataclass
class LinearIO:
    """What `capture_linear_io` recorded, by module name."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, T, d_in), detached
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, T, d_out)


@contextlib.contextmanager
def capture_linear_io(
    model: nn.Module, module_names: Sequence[str], *, grads: bool = True
) -> Iterator[LinearIO]:
    """Record each module's input u and, after a backward pass, the gradient δ at its output.

    With `grads`, an input that does not require grad is replaced by an equal leaf tensor that does,
    so a backward pass reaches the hooked modules even when every parameter is frozen, and stops
    there: autograd never goes below the earliest hooked module. The forward values are unchanged.
    The gradient of one call's output is recorded through a tensor hook on that output (each module
    is expected to run once per forward).
    """
    io = LinearIO()

    def make_pre_hook(name: str) -> ForwardPreHook:
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]  # (B, T, d_in)
            io.inputs[name] = x.detach()
            if grads and torch.is_grad_enabled() and not x.requires_grad:
                return (x.detach().requires_grad_(True), *args[1:])
            return None

        return pre_hook

    def make_hook(name: str) -> ForwardHook:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if grads and isinstance(output, torch.Tensor) and output.requires_grad:

                def store(grad: torch.Tensor) -> None:  # (B, T, d_out)
                    io.output_grads[name] = grad.detach()

                output.register_hook(store)

        return hook

    with forward_hooks(
        model,
        hooks={name: make_hook(name) for name in module_names},
        pre_hooks={name: make_pre_hook(name) for name in module_names},
    ):
        yield io
