"""The ModelSpec registry: the architecture facts factedit relies on, written down once per family.

Which module list holds the transformer blocks, which modules inside a block are the MLP matrices,
whether those are stored as ``nn.Linear`` (out, in) or as GPT-2's ``Conv1D`` (in, out), and which
config attribute holds the layer count. Nothing here is guessed from a model's name or from weight
shapes: a model whose ``config.model_type`` has no spec is refused with an error that lists the
supported ones, and a spec whose paths do not resolve on the given model is refused too.

Every path below was checked against the module names of transformers 5.23 (tests/test_specs.py builds
a tiny random model of each architecture and checks every name and shape).

MLP roles, the names callers use for the matrices of one block:
    ``"in"``    the up projection, hidden -> intermediate (``up_proj``, ``c_fc``, ``fc_in``, ...)
    ``"gate"``  the gate projection of gated MLPs (SwiGLU/GeGLU), hidden -> intermediate
    ``"out"``   the down projection, intermediate -> hidden (``down_proj``, ``c_proj``, ``fc_out``, ...)
    ``"act"``   an alias: the matrix whose output goes through the activation function, i.e. ``"gate"``
                in gated MLPs and ``"in"`` elsewhere. It names the same part of the computation on every
                architecture, so one config (e.g. the lora default) fits GPT-2 and Llama alike.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.errors import ConfigError, UnsupportedModelError

__all__ = [
    "SPECS",
    "ModelSpec",
    "blocks",
    "layer_index",
    "mlp_module_name",
    "mlp_param_names",
    "num_layers",
    "resolve_layers",
    "spec_for",
    "supported_model_types",
    "weight_layout",
]

Layout = Literal["out_in", "in_out"]
ACT = "act"  # role alias: the matrix whose output goes through the activation ("gate" or "in")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of one model family (see the module docstring)."""

    name: str  # family name: "llama", "gpt2", "gpt_neox", "gptj", "gemma"
    model_types: tuple[str, ...]  # the config.model_type values this spec handles
    layers_path: str  # dotted path from the CausalLM model to the ModuleList of blocks
    mlp_modules: Mapping[str, str] = field(hash=False)  # role -> module path inside one block
    conv1d: bool  # True when the MLP weights are GPT-2 Conv1D, stored (in_features, out_features)
    n_layers_attr: str  # config attribute holding the number of blocks

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_modules", MappingProxyType(dict(self.mlp_modules)))

    @property
    def roles(self) -> tuple[str, ...]:
        """The MLP roles this architecture has, in the spec's order."""
        return tuple(self.mlp_modules)

    def role(self, name: str) -> str:
        """The real role a role name stands for ("act" resolved, see the module docstring), checked."""
        real = ("gate" if "gate" in self.mlp_modules else "in") if name == ACT else name
        if real not in self.mlp_modules:
            raise ConfigError(
                f"unknown MLP role {name!r} for {self.name!r} models; this architecture has: "
                f"{', '.join(repr(r) for r in self.roles)} (and {ACT!r}, the matrix before the activation)"
            )
        return real

    @property
    def layout(self) -> Layout:
        """Storage orientation of the MLP matrices: "in_out" (Conv1D) or "out_in" (nn.Linear)."""
        return "in_out" if self.conv1d else "out_in"


_GATED = {"gate": "mlp.gate_proj", "in": "mlp.up_proj", "out": "mlp.down_proj"}

SPECS: tuple[ModelSpec, ...] = (
    # Llama family; SmolLM/SmolLM2 (the default model) report model_type "llama".
    ModelSpec("llama", ("llama", "mistral", "qwen2"), "model.layers", _GATED, False, "num_hidden_layers"),
    ModelSpec("gpt2", ("gpt2",), "transformer.h", {"in": "mlp.c_fc", "out": "mlp.c_proj"}, True, "n_layer"),
    ModelSpec(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        {"in": "mlp.dense_h_to_4h", "out": "mlp.dense_4h_to_h"},
        False,
        "num_hidden_layers",
    ),
    ModelSpec("gptj", ("gptj",), "transformer.h", {"in": "mlp.fc_in", "out": "mlp.fc_out"}, False, "n_layer"),
    # "gemma3" is the multimodal config (Gemma3ForConditionalGeneration); it is refused in spec_for
    # with an explanation, because its blocks live at model.language_model.layers. The text-only
    # Gemma3ForCausalLM reports "gemma3_text".
    ModelSpec(
        "gemma",
        ("gemma", "gemma2", "gemma3", "gemma3_text"),
        "model.layers",
        _GATED,
        False,
        "num_hidden_layers",
    ),
)

_BY_MODEL_TYPE: Mapping[str, ModelSpec] = MappingProxyType(
    {model_type: spec for spec in SPECS for model_type in spec.model_types}
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` that has a spec, sorted."""
    return sorted(_BY_MODEL_TYPE)


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise UnsupportedModelError(
            f"cannot tell the architecture of a {type(model_or_config).__name__}: expected a transformers "
            f"model or config with a model_type; supported model types: {', '.join(supported_model_types())}"
        )
    return config


def spec_for(model_or_config: Any) -> ModelSpec:
    """The spec for a model or config, found by ``config.model_type`` (a bare model_type string works too).

    Raises UnsupportedModelError, listing the supported model types, when there is none.
    """
    if isinstance(model_or_config, str):
        model_type, config = model_or_config, None
    else:
        config = _config_of(model_or_config)
        model_type = config.model_type
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}"
            + (
                f" ({type(model_or_config).__name__})"
                if config is not None and config is not model_or_config
                else ""
            )
            + f"; supported model types: {', '.join(supported_model_types())}"
        )
    if model_type == "gemma3" and config is not None and getattr(config, "text_config", None) is not None:
        raise UnsupportedModelError(
            "the multimodal Gemma 3 model (Gemma3ForConditionalGeneration, model_type 'gemma3') keeps its "
            "decoder blocks at 'model.language_model.layers', which factedit does not support; use a "
            "text-only Gemma 3 checkpoint loaded as Gemma3ForCausalLM (model_type 'gemma3_text')"
        )
    return spec


def _layers(model: nn.Module, spec: ModelSpec) -> nn.ModuleList:
    """The ModuleList of blocks at the spec's path, checked to be there."""
    obj: Any = model
    for part in spec.layers_path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if not isinstance(obj, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model type {model.config.model_type!r}) has no block list at "
            f"{spec.layers_path!r}, where the {spec.name!r} spec expects it; pass the causal-LM model "
            "itself (e.g. AutoModelForCausalLM), not a base model or a wrapper around it"
        )
    return obj


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order (the ModuleList at its spec's `layers_path`)."""
    return _layers(model, spec_for(model))


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks, from the config attribute the spec names (checked against the model)."""
    spec = spec_for(model)
    n = getattr(model.config, spec.n_layers_attr, None)
    if not isinstance(n, int):
        raise UnsupportedModelError(
            f"config of {type(model).__name__} has no integer {spec.n_layers_attr!r} (the layer count)"
        )
    found = len(_layers(model, spec))
    if found != n:
        raise UnsupportedModelError(
            f"config.{spec.n_layers_attr} = {n} but {spec.layers_path} holds {found} blocks; "
            "the model and its config disagree"
        )
    return n


def _as_index(layer: Any) -> int:
    if isinstance(layer, bool):
        raise ConfigError(f"layer must be an integer, got {layer!r}")
    try:
        return operator.index(layer)
    except TypeError:
        raise ConfigError(f"layer must be an integer, got {layer!r}") from None


def resolve_layers(model: nn.Module, layers: Sequence[int] | int) -> tuple[int, ...]:
    """Layer indices made non-negative (Python-style negatives count from the end), sorted and unique.

    A layer outside the model, a non-integer, or an empty selection is a ConfigError naming the valid range.
    """
    n = num_layers(model)
    if isinstance(layers, (str, bytes)):
        raise ConfigError(f"layers must be integers, got {layers!r}")
    if not isinstance(layers, Sequence) and not hasattr(layers, "__iter__"):
        layers = (layers,)  # a single int
    indices = [_as_index(layer) for layer in layers]
    if not indices:
        raise ConfigError(f"no layers given; this model has {n} layers: 0..{n - 1} (or -{n}..-1)")
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ConfigError(
            f"layer {', '.join(map(str, bad))} out of range: this model has {n} layers, "
            f"valid indices are 0..{n - 1} (or -{n}..-1 counting from the end)"
        )
    return tuple(sorted({i % n for i in indices}))


def mlp_module_name(model: nn.Module, layer: int, role: str) -> str:
    """Full dotted module name of one MLP matrix, e.g. ``"model.layers.3.mlp.down_proj"``."""
    spec = spec_for(model)
    real = spec.role(role)
    (index,) = resolve_layers(model, (layer,))
    return f"{spec.layers_path}.{index}.{spec.mlp_modules[real]}"


def module_of(param_name: str) -> str:
    """The module that owns a parameter: "model.layers.3.mlp.down_proj.weight" -> "model.layers.3.mlp.down_proj"."""
    return param_name.rpartition(".")[0]


def mlp_param_names(model: nn.Module, layers: Sequence[int] | int, roles: Sequence[str] | str) -> list[str]:
    """Full names of the MLP weight matrices, ordered by layer, then by the role order given.

    ``layers`` go through resolve_layers (negatives allowed, duplicates dropped); roles go through
    ``ModelSpec.role`` ("act" resolved), and a role named twice (also via "act") counts once.
    Every name is checked to exist on the model.
    """
    spec = spec_for(model)
    if isinstance(roles, str):
        roles = (roles,)
    if not roles:
        raise ConfigError(f"no MLP roles given; this architecture has: {', '.join(map(repr, spec.roles))}")
    roles = list(dict.fromkeys(spec.role(role) for role in roles))
    blocks = _layers(model, spec)
    names = []
    for index in resolve_layers(model, layers):
        for role in roles:
            module = blocks[index].get_submodule(spec.mlp_modules[role])
            if not isinstance(getattr(module, "weight", None), nn.Parameter):
                raise UnsupportedModelError(
                    f"{spec.layers_path}.{index}.{spec.mlp_modules[role]} has no weight parameter"
                )
            names.append(f"{spec.layers_path}.{index}.{spec.mlp_modules[role]}.weight")
    return names


def layer_index(model: nn.Module, param_name: str) -> int:
    """The block a parameter belongs to ("model.layers.7.mlp.down_proj.weight" -> 7)."""
    prefix = spec_for(model).layers_path + "."
    if not param_name.startswith(prefix):
        raise ConfigError(f"{param_name!r} is not inside a transformer block ({prefix}<i>.…)")
    return int(param_name[len(prefix) :].split(".", 1)[0])


def weight_layout(model: nn.Module, param_name: str) -> Layout:
    """How a weight matrix is stored: ``"out_in"`` (nn.Linear) or ``"in_out"`` (GPT-2 Conv1D).

    For the MLP matrices the answer is the spec's (``ModelSpec.conv1d``), checked against the class of
    the module that owns the parameter: a spec that disagrees with the model is refused rather than
    trusted. Other matrices (e.g. GPT-2's lm_head, a Linear) are told by their module's class. Never
    from the shape: a square matrix is no problem.
    """
    spec = spec_for(model)
    module_name, _, leaf = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ConfigError(f"model has no parameter {param_name!r}") from None
    if leaf != "weight" or not isinstance(module, (nn.Linear, Conv1D)):
        raise ConfigError(
            f"{param_name!r} is not the weight matrix of a Linear or Conv1D module "
            f"(its module is a {type(module).__name__})"
        )
    actual: Layout = "in_out" if isinstance(module, Conv1D) else "out_in"
    if _is_mlp_matrix(spec, module_name) and actual != spec.layout:
        raise UnsupportedModelError(
            f"the {spec.name!r} spec stores MLP matrices as {spec.layout!r}, but {module_name} is a "
            f"{type(module).__name__} ({actual!r}); the spec does not fit this model"
        )
    return actual


def _is_mlp_matrix(spec: ModelSpec, module_name: str) -> bool:
    prefix = spec.layers_path + "."
    if not module_name.startswith(prefix):
        return False
    _, _, inside = module_name[len(prefix) :].partition(".")
    return inside in spec.mlp_modules.values()
