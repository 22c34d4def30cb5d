"""The ModelSpec registry, checked against real transformers module names on tiny random models."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import ARCHS, HIDDEN, INTERMEDIATE, N_LAYERS, tiny_model
from torch import nn

from factedit.core.errors import ConfigError, UnsupportedModelError
from factedit.model.specs import (
    ModelSpec,
    mlp_module_name,
    mlp_param_names,
    num_layers,
    resolve_layers,
    spec_for,
    supported_model_types,
    weight_layout,
)

EXPECTED = {  # arch -> (spec name, layers path, {role: module inside a block}, stored (in, out))
    "llama": (
        "llama",
        "model.layers",
        {"gate": "mlp.gate_proj", "in": "mlp.up_proj", "out": "mlp.down_proj"},
        False,
    ),
    "mistral": (
        "llama",
        "model.layers",
        {"gate": "mlp.gate_proj", "in": "mlp.up_proj", "out": "mlp.down_proj"},
        False,
    ),
    "qwen2": (
        "llama",
        "model.layers",
        {"gate": "mlp.gate_proj", "in": "mlp.up_proj", "out": "mlp.down_proj"},
        False,
    ),
    "gemma": (
        "gemma",
        "model.layers",
        {"gate": "mlp.gate_proj", "in": "mlp.up_proj", "out": "mlp.down_proj"},
        False,
    ),
    "gemma3_text": (
        "gemma",
        "model.layers",
        {"gate": "mlp.gate_proj", "in": "mlp.up_proj", "out": "mlp.down_proj"},
        False,
    ),
    "gpt2": ("gpt2", "transformer.h", {"in": "mlp.c_fc", "out": "mlp.c_proj"}, True),
    "gpt_neox": (
        "gpt_neox",
        "gpt_neox.layers",
        {"in": "mlp.dense_h_to_4h", "out": "mlp.dense_4h_to_h"},
        False,
    ),
    "gptj": ("gptj", "transformer.h", {"in": "mlp.fc_in", "out": "mlp.fc_out"}, False),
}


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    model, _ = tiny_model(request.param)
    return request.param, model


def test_every_tiny_arch_has_an_expectation():
    assert set(ARCHS) == set(EXPECTED)


def test_spec_matches_real_module_names(arch_model):
    arch, model = arch_model
    name, layers_path, modules, conv1d = EXPECTED[arch]
    spec = spec_for(model)
    assert spec is spec_for(model.config) is spec_for(model.config.model_type)
    assert (spec.name, spec.layers_path, dict(spec.mlp_modules), spec.conv1d) == (
        name,
        layers_path,
        modules,
        conv1d,
    )
    assert model.config.model_type in spec.model_types
    assert isinstance(model.get_submodule(spec.layers_path), nn.ModuleList)
    assert num_layers(model) == N_LAYERS == len(model.get_submodule(spec.layers_path))


def test_param_names_exist_with_expected_orientation(arch_model):
    arch, model = arch_model
    spec = spec_for(model)
    params = dict(model.named_parameters())
    roles = list(spec.roles)
    names = mlp_param_names(model, range(N_LAYERS), roles)
    assert len(names) == N_LAYERS * len(roles)
    for i, name in enumerate(names):
        layer, role = divmod(i, len(roles))
        assert name == f"{spec.layers_path}.{layer}.{spec.mlp_modules[roles[role]]}.weight"
        assert name == mlp_module_name(model, layer, roles[role]) + ".weight"
        assert name in params
        # in/gate map hidden -> intermediate, out maps intermediate -> hidden
        in_f, out_f = (INTERMEDIATE, HIDDEN) if roles[role] == "out" else (HIDDEN, INTERMEDIATE)
        layout = weight_layout(model, name)
        assert layout == ("in_out" if arch == "gpt2" else "out_in")  # gpt2's MLP matrices are Conv1D
        expected_shape = (in_f, out_f) if layout == "in_out" else (out_f, in_f)
        assert tuple(params[name].shape) == expected_shape, name


def test_param_names_order_layer_then_given_roles(arch_model):
    _, model = arch_model
    spec = spec_for(model)
    names = mlp_param_names(model, [-1, 0, 0], ["out", "in", "out"])
    assert names == [
        f"{spec.layers_path}.0.{spec.mlp_modules['out']}.weight",
        f"{spec.layers_path}.0.{spec.mlp_modules['in']}.weight",
        f"{spec.layers_path}.{N_LAYERS - 1}.{spec.mlp_modules['out']}.weight",
        f"{spec.layers_path}.{N_LAYERS - 1}.{spec.mlp_modules['in']}.weight",
    ]


def test_resolve_layers(arch_model):
    _, model = arch_model
    n = N_LAYERS
    assert resolve_layers(model, [-1]) == (n - 1,)
    assert resolve_layers(model, (3, -1, 0, -n, 1)) == (0, 1, 3)
    assert resolve_layers(model, range(n)) == tuple(range(n))
    assert resolve_layers(model, 2) == (2,)
    assert resolve_layers(model, [torch.tensor(1)]) == (1,)
    for bad in ([n], [-n - 1], [0, 99]):
        with pytest.raises(ConfigError, match=rf"0\.\.{n - 1}.*-{n}\.\.-1"):
            resolve_layers(model, bad)
    for bad in ([], "1", [1.5], [True]):
        with pytest.raises(ConfigError):
            resolve_layers(model, bad)


def test_unknown_role_lists_roles(arch_model):
    _, model = arch_model
    spec = spec_for(model)
    with pytest.raises(ConfigError) as info:
        mlp_module_name(model, 0, "down")
    for role in spec.roles:
        assert repr(role) in str(info.value)
    with pytest.raises(ConfigError, match="'in'"):
        mlp_param_names(model, [0], ["in", "bogus"])
    with pytest.raises(ConfigError):
        mlp_module_name(model, N_LAYERS, "in")


def test_act_role_is_the_matrix_feeding_the_activation(arch_model):
    """Behavioural check of the "act" alias: the activation function's input is exactly that matrix's
    output (the activation module is found by name, not through the spec)."""
    _, model = arch_model
    spec = spec_for(model)
    mlp = model.get_submodule(f"{spec.layers_path}.0.mlp")
    (activation,) = [m for name, m in mlp.named_children() if name in ("act", "act_fn")]
    act_name = mlp_module_name(model, 0, "act")
    seen = {}
    hooks = [
        activation.register_forward_hook(lambda _m, args, _out: seen.setdefault("act_input", args[0])),
        model.get_submodule(act_name).register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out)),
    ]
    try:
        model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(seen["act_input"], seen["out"])
    assert spec.role("act") == ("gate" if "gate" in spec.roles else "in")
    # the alias and its role count once; the order is that of first mention
    assert mlp_param_names(model, [0], ["act", spec.role("act"), "out"]) == [
        f"{act_name}.weight",
        mlp_module_name(model, 0, "out") + ".weight",
    ]


def test_gate_role_only_on_gated_mlps():
    model, _ = tiny_model("gpt2")
    with pytest.raises(ConfigError, match=r"'in', 'out'"):
        mlp_param_names(model, [0], ["gate"])
    model, _ = tiny_model("llama")
    assert mlp_param_names(model, [0], "gate") == ["model.layers.0.mlp.gate_proj.weight"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gptj"])
def test_layout_comes_from_spec_not_shape(arch):
    """With intermediate == hidden every MLP matrix is square; the layout still follows the architecture."""
    model, _ = tiny_model(arch, intermediate=HIDDEN)
    params = dict(model.named_parameters())
    expected = "in_out" if arch == "gpt2" else "out_in"
    for name in mlp_param_names(model, [0, -1], spec_for(model).roles):
        assert params[name].shape[0] == params[name].shape[1]
        assert weight_layout(model, name) == expected


def test_a_spec_whose_layout_disagrees_with_the_model_is_refused(monkeypatch):
    """The MLP layout is the spec's: a spec claiming Linear for GPT-2's Conv1D MLP must not be trusted."""
    import dataclasses

    from factedit.model import specs

    model, _ = tiny_model("gpt2")
    wrong = dataclasses.replace(spec_for(model), conv1d=False)
    monkeypatch.setattr(specs, "spec_for", lambda _model: wrong)
    with pytest.raises(UnsupportedModelError, match="does not fit this model"):
        weight_layout(model, "transformer.h.0.mlp.c_fc.weight")
    assert weight_layout(model, "lm_head.weight") == "out_in"  # not an MLP matrix: its class decides


def test_gpt2_layout_is_per_parameter():
    """GPT-2's blocks are Conv1D (in, out) but its lm_head is an nn.Linear (out, in)."""
    model, _ = tiny_model("gpt2")
    assert weight_layout(model, "transformer.h.0.attn.c_attn.weight") == "in_out"
    assert weight_layout(model, "lm_head.weight") == "out_in"
    with pytest.raises(ConfigError):
        weight_layout(model, "transformer.ln_f.weight")  # not a matrix
    with pytest.raises(ConfigError):
        weight_layout(model, "transformer.h.0.mlp.c_fc.bias")
    with pytest.raises(ConfigError):
        weight_layout(model, "transformer.nope.weight")


def test_unsupported_model_type_lists_supported():
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    for arg in (config, "bert"):
        with pytest.raises(UnsupportedModelError) as info:
            spec_for(arg)
        for model_type in supported_model_types():
            assert model_type in str(info.value)
        assert "'bert'" in str(info.value)
    with pytest.raises(UnsupportedModelError):
        spec_for(object())
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


def test_supported_model_types():
    types = supported_model_types()
    assert types == sorted(types)
    for model_type in (
        "llama",
        "mistral",
        "qwen2",
        "gpt2",
        "gpt_neox",
        "gptj",
        "gemma",
        "gemma2",
        "gemma3_text",
    ):
        assert model_type in types


def test_base_model_without_lm_head_is_refused():
    model, _ = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="model.layers"):
        num_layers(model.model)  # LlamaModel: its blocks are at .layers, not .model.layers


def test_multimodal_gemma3_is_refused_clearly():
    config = transformers.Gemma3Config(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "vocab_size": 64,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 14,
        },
    )
    assert config.model_type == "gemma3"
    with pytest.raises(UnsupportedModelError, match="language_model.*Gemma3ForCausalLM"):
        spec_for(config)


def test_spec_is_frozen_and_small():
    spec = spec_for("llama")
    assert isinstance(spec, ModelSpec)
    with pytest.raises(AttributeError):
        spec.layers_path = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.mlp_modules["in"] = "x"  # type: ignore[index]
    hash(spec)
