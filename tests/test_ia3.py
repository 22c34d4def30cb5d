"""(IA)³ on attention keys and values (model/attention.py, model/scalings.py, modules/ia3.py) on tiny random
models of every supported architecture: the key/value facts name exactly the keys and values (also inside
GPT-2's and GPT-NeoX's fused qkv matrices, and with grouped-query attention), a folded vector equals
scaling the module's output at run time, and an `ia3` edit with `kv=True` changes only those rows (and
the MLP's), moves the target, and reverts exactly (`torch.equal`)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from tiny_models import ARCHS, tiny_model

import factedit
from factedit.core.errors import ConfigError
from factedit.model.attention import kv_projection
from factedit.model.scalings import ia3_scalings

TINY_KV = dict(layers=(-2, -1), kv=True, lr=0.3, max_steps=80)
PROBES = ["The capital of France is", "The capital of Italy is", "Water boils at one hundred"]
# The query projection of the families with separate q/k/v matrices (only the test needs it).
QUERY = {"gpt2": None, "gpt_neox": None, "gptj": "attn.q_proj"}


def logits(model, tok) -> torch.Tensor:
    ids = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits  # (B, T, V)


def query_rows(model, layer: int) -> tuple[str, torch.Tensor | None]:
    """The module computing block `layer`'s queries and its query output features (None: all)."""
    k, v = kv_projection(model, layer, "k"), kv_projection(model, layer, "v")
    if k.features is None:
        block = k.module.rsplit(".", 2)[0]
        arch = model.config.model_type
        return f"{block}.{QUERY.get(arch, 'self_attn.q_proj')}", None
    out = model.get_submodule(k.module).weight.shape[1 if k.conv1d else 0]
    mask = torch.ones(out, dtype=torch.bool)
    mask[k.features] = mask[v.features] = False
    return k.module, mask.nonzero().squeeze(1)


def scale_outputs(model, module: str, features: torch.Tensor | None, factor: float, conv1d: bool) -> None:
    """Multiply some output features of `module` (weight and bias) by `factor`, in place."""
    m = model.get_submodule(module)
    out = m.weight.shape[1 if conv1d else 0]
    f = torch.ones(out)
    f[features if features is not None else slice(None)] = factor
    with torch.no_grad():
        m.weight.mul_(f[None, :] if conv1d else f[:, None])
        if getattr(m, "bias", None) is not None:
            m.bias.mul_(f)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_keys_make_a_block_blind_to_its_queries(arch):
    """With a block's keys zeroed, every score is equal: changing its queries changes nothing, so the
    features named as keys are all of the keys (and no query feature is among them)."""
    model, tok = tiny_model(arch)
    k = kv_projection(model, 1, "k")
    scale_outputs(model, k.module, k.features, 0.0, k.conv1d)
    before = logits(model, tok)
    q_module, q_features = query_rows(model, 1)
    scale_outputs(model, q_module, q_features, 3.0, k.conv1d)
    assert torch.allclose(logits(model, tok), before, atol=1e-5)
    scale_outputs(model, k.module, k.features, 1.0, k.conv1d)  # (the check can fail: keys do matter)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_values_make_a_block_blind_to_queries_and_keys(arch):
    model, tok = tiny_model(arch)
    k, v = kv_projection(model, 1, "k"), kv_projection(model, 1, "v")
    base = logits(model, tok)
    scale_outputs(model, v.module, v.features, 0.0, v.conv1d)
    zeroed = logits(model, tok)
    assert not torch.allclose(zeroed, base, atol=1e-4)
    q_module, q_features = query_rows(model, 1)
    scale_outputs(model, q_module, q_features, 3.0, k.conv1d)
    scale_outputs(model, k.module, k.features, 0.5, k.conv1d)
    assert torch.allclose(logits(model, tok), zeroed, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_folded_vector_equals_scaling_the_output_at_run_time(arch):
    model, tok = tiny_model(arch)
    generator = torch.Generator().manual_seed(0)
    scalings = ia3_scalings(model, (-1,), ("mlp", "k", "v"))
    scales = {s.module: 1 + 0.5 * torch.randn(s.size, generator=generator) for s in scalings}

    def hook_for(s):
        if s.side == "in":
            return s.module, lambda mod, args: (args[0] * scales[s.module],)  # the input h scaled
        def out(mod, args, y):
            return y * s.full(scales[s.module], y.shape[-1])
        return s.module, out

    handles = []
    for s in scalings:
        name, fn = hook_for(s)
        register = model.get_submodule(name).register_forward_pre_hook if s.side == "in" else \
            model.get_submodule(name).register_forward_hook
        handles.append(register(fn))
    at_run_time = logits(model, tok)
    for h in handles:
        h.remove()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in scalings:
            params[s.weight].copy_(s.fold(params[s.weight], scales[s.module]))
            if s.bias:
                params[s.bias].copy_(s.fold_bias(params[s.bias], scales[s.module]))
    assert torch.allclose(logits(model, tok), at_run_time, atol=1e-5, rtol=1e-4)


def test_unknown_targets_are_refused():
    model, tok = tiny_model("llama")
    with pytest.raises(ConfigError, match="targets"):
        ia3_scalings(model, (0,), ("q",))
    with pytest.raises(ConfigError, match="kv"):
        factedit.Editor("ia3", tokenizer=tok, kv="maybe")


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_edit_changes_only_mlp_and_kv_rows_and_reverts_exactly(arch):
    model, tok = tiny_model(arch)
    base, base_logits = snapshot(model), logits(model, tok)
    editor = factedit.Editor("ia3", tokenizer=tok, **TINY_KV)
    record = editor.edit(model, "The capital of France is", "Rome")
    assert record.post["requests"][0]["target_prob"] > record.pre["requests"][0]["target_prob"]
    scalings = ia3_scalings(model, (-2, -1), ("mlp", "k", "v"))
    assert list(record.delta.params) == [n for s in scalings for n in s.param_names()]
    for s in scalings:
        if s.features is not None:  # fused qkv: the query rows did not move, bit for bit
            dense = record.delta.params[s.weight].dense
            keep = torch.ones(dense.shape[s.axis], dtype=torch.bool)
            keep[s.features] = False
            assert not dense.index_select(s.axis, keep.nonzero().squeeze(1)).any()
    kv = [s for s in scalings if s.side == "out"]
    assert any(record.delta.params[s.weight].dense.any() for s in kv)
    editor.revert(model, record.id)
    assert torch.equal(logits(model, tok), base_logits)
    assert_weights_equal(model, base)
