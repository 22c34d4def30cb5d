"""The module-adding editors (factedit/modules/: grace, tpatcher, adapter, bitfit) on tiny random models of
every supported architecture: compute leaves the model as it was (weights, hooks, modes), an edit moves the
target, and revert is exact (logits and weights, `torch.equal`), also of a middle edit, a batch, and after a
journal replay. ia3, in the same folder, folds into the weights (W += Δ): tests/test_contract.py runs its
contract with the other weight editors; here, its guard and its export."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_weights_equal, no_hooks, snapshot
from tiny_models import ARCHS, tiny_model

import factedit
from factedit.core.methods import get_method
from factedit.core.request import EditRequest, tokenize_request
from factedit.core.side import run_modules
from factedit.modules.training import text_points
from factedit.safety.reference import reference_texts

# Tiny random models need bolder settings than a trained model to learn a fact in a few steps.
TINY = {
    "grace": dict(layer=-1),
    "tpatcher": dict(layer=-1, lr=0.1),
    # A tiny random model's hidden states look alike at every token, so the locality term (tested on its own
    # below) would hold the edit back too: off here.
    "adapter": dict(layer=-1, lr=3e-2, locality=0.0),
    "ia3": dict(layers=(-2, -1), lr=0.3, max_steps=80),
    "bitfit": dict(layers=(-2, -1), lr=0.1, max_steps=60),
}
SIDE = sorted(TINY.keys() - {"ia3"})
PROBES = ["The capital of France is", "The capital of Italy is", "Water boils at one hundred"]
FACTS = [("The capital of France is", "Rome"), ("The capital of Italy is", "Berlin"),
         ("The capital of Germany is", "Madrid")]


def logits(model, tok) -> torch.Tensor:
    ids = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits  # (B, T, V)


def test_the_methods_are_registered_with_a_description():
    for method in TINY:
        assert get_method(method).description


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", SIDE)
def test_compute_leaves_the_model_unchanged(method, arch):
    model, tok = tiny_model(arch)
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    editor = factedit.Editor(method, tokenizer=tok, **TINY[method])
    delta = editor._impl.compute(model, tok, [tokenize_request(EditRequest(*FACTS[0]), tok, None)])
    assert delta.modules and not delta.params
    assert_weights_equal(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert no_hooks(model)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", SIDE)
def test_edit_moves_the_target_and_revert_is_exact(method, arch):
    model, tok = tiny_model(arch)
    base, base_logits = snapshot(model), logits(model, tok)
    editor = factedit.Editor(method, tokenizer=tok, **TINY[method])
    record = editor.edit(model, *FACTS[0])
    pre, post = record.pre["requests"][0], record.post["requests"][0]
    assert post["target_prob"] > pre["target_prob"]
    if arch != "gemma3_text":  # its norm after the MLP bounds one MLP's reach
        assert post["target_is_argmax"]
    assert not torch.equal(logits(model, tok), base_logits)
    editor.revert(model, record.id)
    assert torch.equal(logits(model, tok), base_logits)
    assert_weights_equal(model, base)
    assert no_hooks(model)


@pytest.mark.parametrize("method", SIDE)
def test_reverting_a_middle_edit_computes_the_other_two_exactly(method):
    model, tok = tiny_model("llama")
    base_logits = logits(model, tok)
    editor = factedit.Editor(method, tokenizer=tok, score=False, **TINY[method])
    records = [editor.edit(model, p, t) for p, t in FACTS]
    editor.revert(model, records[1].id)

    reference, _ = tiny_model("llama")
    other = factedit.Editor(method, tokenizer=tok, score=False, **TINY[method])
    other.attach(reference)
    for record in (records[0], records[2]):
        other._state.apply(reference, record.id, record.delta)
    assert torch.equal(logits(model, tok), logits(reference, tok))
    assert_weights_equal(model, snapshot(reference))
    editor.revert_all(model)
    assert torch.equal(logits(model, tok), base_logits)


def test_the_adapters_locality_term_leaves_unrelated_tokens_closer_to_the_base():
    """The change an adapter makes at the MLP outputs of statements it was NOT held on (reference statements
    32-63; the term holds 0-31) shrinks when its locality weight goes from 0 to 10, and the edit still lands."""
    model, tok = tiny_model("llama")
    change = {}
    for weight in (0.0, 10.0):
        editor = factedit.Editor("adapter", tokenizer=tok, **{**TINY["adapter"], "locality": weight})
        record = editor.edit(model, *FACTS[0])
        assert record.post["requests"][0]["target_prob"] > record.pre["requests"][0]["target_prob"]
        editor.revert(model, record.id)
        (module,) = record.delta.modules.values()
        x, y = text_points(model, tok, reference_texts("statements")[32:64], module.point)  # (m, d) each
        change[weight] = float((run_modules([module], x, y) - y).pow(2).sum(-1).mean())
    assert change[10.0] < 0.5 * change[0.0], change


def test_adapter_bitfit_and_ia3_are_guarded_and_a_refused_side_module_leaves_nothing_behind():
    model, tok = tiny_model("llama")
    assert all(factedit.Editor(m, tokenizer=tok).guard is not None for m in ("adapter", "bitfit", "ia3"))
    base, base_logits = snapshot(model), logits(model, tok)
    # A bold adapter and a guard that allows almost no drift: the edit is undone and refused.
    editor = factedit.Editor("adapter", tokenizer=tok, guard=1.0001, **{**TINY["adapter"], "lr": 1.0})
    with pytest.raises(factedit.DriftError):
        editor.edit(model, *FACTS[0])
    assert not editor.history and no_hooks(model)
    assert torch.equal(logits(model, tok), base_logits)
    assert_weights_equal(model, base)


def test_grace_edit_batch_adds_entries_for_every_fact_and_revert_removes_exactly_them():
    model, tok = tiny_model("llama")
    base_logits = logits(model, tok)
    editor = factedit.Editor("grace", tokenizer=tok, **TINY["grace"])
    first = editor.edit(model, *FACTS[2])
    after_first = logits(model, tok)
    batch = editor.edit_batch(model, [EditRequest(*FACTS[0]), EditRequest(*FACTS[1])])
    assert all(r["target_is_argmax"] for r in batch.post["requests"])
    (codebook,) = batch.delta.modules.values()
    targets = sum(len(tokenize_request(EditRequest(*f), tok, None).target_ids) for f in FACTS[:2])
    assert codebook.tensors["keys"].shape[0] == targets  # one key position per target token
    editor.revert(model, batch.id)
    assert torch.equal(logits(model, tok), after_first)
    editor.revert(model, first.id)
    assert torch.equal(logits(model, tok), base_logits)


@pytest.mark.parametrize("method", SIDE)
def test_a_journal_replays_the_modules_on_a_fresh_model(method, tmp_path):
    model, tok = tiny_model("gpt2")
    path = tmp_path / "edits.sqlite"
    editor = factedit.Editor(method, tokenizer=tok, score=False, journal=path, **TINY[method])
    for prompt, target in FACTS[:2]:
        editor.edit(model, prompt, target)
    edited = logits(model, tok)
    editor.close()
    fresh, tok2 = tiny_model("gpt2")
    base_logits = logits(fresh, tok2)
    reopened = factedit.Editor(method, tokenizer=tok2, score=False, journal=path, **TINY[method])
    reopened.attach(fresh)
    assert torch.equal(logits(fresh, tok2), edited)
    reopened.revert_all(fresh)
    assert torch.equal(logits(fresh, tok2), base_logits)
    reopened.close()


def test_ia3_exports_as_a_lora_adapter_and_side_methods_do_not(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ia3", tokenizer=tok, **TINY["ia3"])
    editor.edit(model, *FACTS[0])
    result = editor.export_adapter(tmp_path / "ia3", rank=4)
    assert (result.path / "adapter_model.safetensors").exists()
    editor.revert_all(model)
    editor.set_method("grace", **TINY["grace"])
    editor.edit(model, *FACTS[0])
    with pytest.raises(factedit.InvalidRequestError, match="side modules"):
        editor.export_adapter(tmp_path / "grace", rank=4)
    assert not (tmp_path / "grace").exists()
