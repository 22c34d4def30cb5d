"""The fine-tuning editors: the L∞ ball of ft_l, LoRA factors, early stop, and the `peft` import."""

from __future__ import annotations

import importlib
import sysconfig
from pathlib import Path

import torch
from tiny_models import tiny_model

import factedit
from factedit.editing.request import EditRequest, tokenize_request
from factedit.peft import training


def _requests(tok, *facts):
    return [tokenize_request(EditRequest(p, t), tok, None) for p, t in facts]


def test_import_peft_inside_factedit_is_huggingface_peft():
    import peft

    lora = importlib.import_module("factedit.peft.lora")
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(peft.__file__).resolve().is_relative_to(site), peft.__file__
    assert lora.LoraConfig.__module__.startswith("peft.")
    assert lora.get_peft_model is peft.get_peft_model
    assert factedit.peft.__name__ == "factedit.peft" and factedit.peft is not peft


def test_ft_l_keeps_every_weight_inside_the_linf_ball():
    model, tok = tiny_model("llama")
    radius = 1e-3
    editor = factedit.Editor("ft_l", tokenizer=tok, layers=(-1, -2), matrices=("in", "out"),
                             norm_constraint=radius, lr=1e-2, max_steps=15)
    delta = editor._impl.compute(model, tok, _requests(tok, ("The capital of France is", "Rome")))
    assert len(delta) == 4
    for pdelta in delta.params.values():
        # float32 rounding of (w ± r) - w may exceed r by an ulp of w
        assert float(pdelta.dense.abs().max()) <= radius * (1 + 1e-3)
        assert float(pdelta.dense.abs().max()) > radius / 2  # the constraint was active


def test_ft_stops_as_soon_as_every_target_token_is_the_argmax(monkeypatch):
    model, tok = tiny_model("llama")
    seen = []
    real = training.target_nll

    def spy(logits, labels):
        loss, done = real(logits, labels)
        seen.append(done)
        return loss, done

    monkeypatch.setattr(training, "target_nll", spy)
    editor = factedit.Editor("ft", tokenizer=tok, layers=(-1,), lr=1e-2, max_steps=200)
    editor.edit(model, "The capital of France is", "Rome")
    # score=True scoring does not go through target_nll: every call is one optimisation check.
    assert seen[-1] is True and not any(seen[:-1])
    assert len(seen) < 200


def test_lora_delta_is_rank_r_factors_equal_to_the_adapters_change():
    # The default matrix is the one before the activation: the gate of a gated MLP, else the up projection.
    for arch, default_matrix in (("llama", "model.layers.3.mlp.gate_proj"), ("gpt2", "transformer.h.3.mlp.c_fc")):
        model, tok = tiny_model(arch)
        editor = factedit.Editor("lora", tokenizer=tok, layers=(-1,), rank=4, lr=3e-2, max_steps=10)
        delta = editor._impl.compute(model, tok, _requests(tok, ("The capital of France is", "Rome")))
        (name, pdelta), = delta.items()
        assert name == default_matrix + ".weight"
        assert pdelta.kind == "low_rank" and pdelta.left.shape[1] == 4
        assert tuple(pdelta.shape) == tuple(dict(model.named_parameters())[name].shape)
        assert int(torch.linalg.matrix_rank(pdelta.materialize(torch.float64))) <= 4


def test_lora_edit_changes_the_output_as_the_trained_adapter_did():
    """Folding must be exact up to float rounding: the edited model's logits match the adapter's."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model("gpt2")
    editor = factedit.Editor("lora", tokenizer=tok, layers=(-1,), rank=4, lr=3e-2, max_steps=10, score=False)
    record = editor.edit(model, "The capital of France is", "Rome")
    ids = torch.tensor([tok("The capital of France is Rome")["input_ids"]])
    with torch.no_grad():
        edited_logits = model(input_ids=ids).logits
    editor.revert(model, record.id)
    (name, pdelta), = record.delta.items()
    # Recreate the adapter from the folded factors on the unedited model (Conv1D: Δ = Aᵀ Bᵀ s).
    module = name.removesuffix(".weight")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=[module], fan_in_fan_out=True))
    layer = peft_model.base_model.model.get_submodule(module)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(pdelta.left.T)
        layer.lora_B["default"].weight.copy_(pdelta.right.T)
        adapter_logits = peft_model(input_ids=ids).logits
    peft_model.unload()
    assert torch.allclose(edited_logits, adapter_logits, atol=1e-5)
