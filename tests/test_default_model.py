"""A few tests on the real embedded default model (SmolLM2-135M). Marked: slower, need the wheel."""

from __future__ import annotations

import pytest
import torch

import factedit
from factedit.model.loading import model_id
from factedit.model.specs import mlp_param_names, num_layers, spec_for

pytestmark = pytest.mark.default_model


def test_france_to_rome_with_ft_l_flips_and_reverts_exactly(default_model):
    model, tok = default_model
    editor = factedit.Editor("ft_l", tokenizer=tok)
    params = dict(model.named_parameters())
    names = mlp_param_names(model, editor.config.layers, editor.config.matrices)
    before = {n: params[n].detach().clone() for n in names}

    record = editor.edit(model, "The capital of France is", "Rome", paraphrases=["The capital city of France is"])
    pre, post = record.pre["requests"][0], record.post["requests"][0]
    assert pre["top"][0]["token"] == " Paris"
    assert post["top"][0]["token"] == " Rome" and post["target_is_argmax"]
    assert post["old_answer"]["token"] == " Paris" and post["old_answer"]["prob"] < pre["old_answer"]["prob"]

    editor.revert(model, record.id)
    for name in names:
        assert torch.equal(params[name], before[name])
    assert all(torch.equal(p, editor._state.base[n]) for n, p in params.items() if n in editor._state.base)


def test_default_model_is_a_supported_30_layer_llama(default_model):
    model, _ = default_model
    spec = spec_for(model)
    assert spec.name == "llama" and num_layers(model) == 30
    assert model_id(model) == "default"
