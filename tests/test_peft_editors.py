"""The fine-tuning editors: the L∞ ball of ft_l, LoRA factors, early stop, and the `peft` import."""

from __future__ import annotations

import importlib
import sysconfig
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_edit_changes_the_output_as_the_trained_adapter_did(arch, monkeypatch):
    """Folding must be exact up to float rounding: the edited model's logits match those of the model
    with the trained adapter still in it (its real scale alpha / r), read just before folding."""
    from factedit.peft import lora

    model, tok = tiny_model(arch)
    ids = torch.tensor([tok("The capital of France is Rome")["input_ids"]])
    adapter_logits = []
    real_fold = lora._fold

    def fold_after_reading_the_adapters_output(layer, layout):
        if not adapter_logits:  # the adapter is injected into `model` in place while compute runs
            with torch.no_grad():
                adapter_logits.append(model(input_ids=ids).logits)
        return real_fold(layer, layout)

    monkeypatch.setattr(lora, "_fold", fold_after_reading_the_adapters_output)
    editor = factedit.Editor("lora", tokenizer=tok, layers=(-1,), rank=4, alpha=12.0, lr=3e-2, max_steps=10,
                             score=False)
    record = editor.edit(model, "The capital of France is", "Rome")
    with torch.no_grad():
        edited_logits = model(input_ids=ids).logits
    editor.revert(model, record.id)
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    assert not torch.allclose(edited_logits, base_logits, atol=1e-3)  # the edit did something
    assert torch.allclose(edited_logits, adapter_logits[0], atol=1e-5)
