"""Assertions shared by the tests."""

from __future__ import annotations

import torch


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def no_hooks(model: torch.nn.Module) -> bool:
    """No forward hook or pre-hook on any module (an edit left nothing attached)."""
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def assert_weights_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), f"{name} differs"
