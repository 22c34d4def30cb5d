"""Where each architecture computes an attention block's keys and values: the companion of the ModelSpec
registry (specs.py) for attention, written down once per family, keyed by the spec's name.

Some families have separate key and value projections (Llama, Mistral, Qwen2, Gemma, GPT-J: `k_proj`,
`v_proj`, with grouped-query attention their outputs are num_key_value_heads × head_dim wide); others
compute queries, keys and values in one fused matrix, and the keys (values) are a fixed set of its output
features:
    GPT-2     `attn.c_attn` (Conv1D), outputs [q | k | v], each `hidden` wide
    GPT-NeoX  `attention.query_key_value` (Linear), per head [q_h | k_h | v_h], each head_dim wide
              (the module views its output as (…, heads, 3·head_dim) and chunks the last dimension)

Scaling the keys (values) by a vector is then scaling those output features: rows of a Linear weight,
columns of a Conv1D weight, and the matching bias entries (tests/test_attention_kv.py checks every
name, width and feature set on tiny models of all supported architectures).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.errors import UnsupportedModelError
from .specs import resolve_layers, spec_for

__all__ = ["KV", "KVProjection", "kv_projection"]

KV = ("k", "v")
Fusion = Literal["none", "thirds", "per_head"]


@dataclass(frozen=True)
class _KVFacts:
    k: str  # module path inside a block computing the keys
    v: str  # module path computing the values (the same module when fused)
    fusion: Fusion  # how keys and values sit among the module's outputs (module docstring)


_FACTS = MappingProxyType({
    "llama": _KVFacts("self_attn.k_proj", "self_attn.v_proj", "none"),
    "gemma": _KVFacts("self_attn.k_proj", "self_attn.v_proj", "none"),
    "gptj": _KVFacts("attn.k_proj", "attn.v_proj", "none"),
    "gpt2": _KVFacts("attn.c_attn", "attn.c_attn", "thirds"),
    "gpt_neox": _KVFacts("attention.query_key_value", "attention.query_key_value", "per_head"),
})


@dataclass(frozen=True)
class KVProjection:
    """The keys (or values) of one block: the module computing them and which of its outputs they are."""

    module: str  # full module name, e.g. "model.layers.3.self_attn.k_proj"
    features: torch.Tensor | None  # (n,) long: indices into the module's output features; None: all of them
    width: int  # n: how many output features are keys (values)
    conv1d: bool  # True for GPT-2's Conv1D (weight stored (in, out)), False for nn.Linear (out, in)
    has_bias: bool


def _fused_features(fusion: Fusion, which: str, out: int, heads: int) -> torch.Tensor | None:
    """Output indices of the keys (which="k") or values ("v") of a fused module with `out` outputs."""
    part = KV.index(which) + 1  # q is part 0
    if fusion == "none":
        return None
    if fusion == "thirds":
        third = out // 3
        return torch.arange(part * third, (part + 1) * third)
    head_dim = out // (3 * heads)
    starts = torch.arange(heads) * 3 * head_dim + part * head_dim  # (heads,)
    return (starts[:, None] + torch.arange(head_dim)[None, :]).reshape(-1)  # (heads * head_dim,)


def kv_projection(model: nn.Module, layer: int, which: str) -> KVProjection:
    """Where block `layer` (negatives count from the end) computes its keys (`which="k"`) or values ("v").

    UnsupportedModelError for a family without attention facts, or whose modules are not where the facts
    say (nothing is guessed from shapes)."""
    if which not in KV:
        raise ValueError(f"which must be 'k' or 'v', got {which!r}")
    spec = spec_for(model)
    facts = _FACTS.get(spec.name)
    if facts is None:
        raise UnsupportedModelError(f"factedit knows no key/value projections for {spec.name!r} models; "
                                    f"known for: {', '.join(_FACTS)}")
    (index,) = resolve_layers(model, (layer,))
    name = f"{spec.layers_path}.{index}.{getattr(facts, which)}"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise UnsupportedModelError(f"{name} is not a Linear or Conv1D module on this {type(model).__name__}; the "
                                    f"key/value facts of {spec.name!r} models do not fit it")
    conv1d = isinstance(module, Conv1D)
    out = int(module.weight.shape[1] if conv1d else module.weight.shape[0])
    heads = int(getattr(model.config, "num_attention_heads", 0) or getattr(model.config, "n_head", 0))
    features = _fused_features(facts.fusion, which, out, heads)
    if features is not None and (out % 3 or (facts.fusion == "per_head" and out % (3 * heads))):
        raise UnsupportedModelError(f"{name} has {out} outputs, not three equal parts per head; cannot tell keys")
    width = out if features is None else int(features.numel())
    return KVProjection(name, features, width, conv1d, getattr(module, "bias", None) is not None)
