"""Prefix tuning as a PEFT prefix adapter (modules/prefix.py): training raises the target's probability
under the prefix, leaves the model exactly as it was, and `PeftModel.from_pretrained` on a fresh base
model gives the logits the trained prefix gave."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_weights_equal, no_hooks, snapshot
from peft import PeftModel
from tiny_models import tiny_model

from factedit.core.errors import ConfigError
from factedit.core.request import EditRequest, tokenize_request
from factedit.modules.prefix import PrefixConfig, train_prefix_adapter
from factedit.scoring.batches import batch_target_logits, make_batch, target_nll_at
from factedit.scoring.sequences import pad_id_of

REQUEST = EditRequest("The capital of France is", "Rome")


def nll(model, tok) -> float:
    batch = make_batch([tokenize_request(REQUEST, tok, None)], pad_id_of(tok), "cpu")
    with torch.no_grad():
        logits = batch_target_logits(model, batch)  # (M, V)
    return float(target_nll_at(logits, batch.labels)[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_trained_prefix_loads_in_peft_and_the_model_is_left_as_it_was(arch, tmp_path):
    model, tok = tiny_model(arch)
    before, base_nll = snapshot(model), nll(model, tok)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    result = train_prefix_adapter(model, tok, [REQUEST], tmp_path / "prefix",
                                  PrefixConfig(num_virtual_tokens=4, lr=0.1, max_steps=60))
    assert_weights_equal(model, before)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert no_hooks(model)
    model.eval()
    assert nll(model, tok) == base_nll
    fresh, _ = tiny_model(arch)
    loaded = PeftModel.from_pretrained(fresh, str(result.path)).eval()
    assert result.nll < base_nll - 0.3  # a tiny random model passes little through attention
    assert abs(nll(loaded, tok) - result.nll) < 1e-4


def test_a_folder_that_holds_files_is_refused(tmp_path):
    model, tok = tiny_model("llama")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        train_prefix_adapter(model, tok, [REQUEST], tmp_path / "busy")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixConfig(num_virtual_tokens=0)
