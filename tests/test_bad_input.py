"""Invariant 9: bad input gets a clear error and changes nothing (weights, history, journal)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_weights_equal, snapshot

import factedit
from factedit.core.delta import Delta, ParamDelta
from factedit.core.methods import MethodSpec, register_method
from factedit.editing import journal as journal_module
from factedit.model.specs import mlp_param_names

FT = dict(layers=(-1,), lr=1e-2, max_steps=30)


@dataclass(frozen=True)
class PoisonConfig:
    value: float = float("nan")


class PoisonDelta:
    """Returns a delta with one bad value among good ones, on two parameters."""

    def __init__(self, config: PoisonConfig) -> None:
        self.config = config

    def compute(self, model, tokenizer, requests) -> Delta:
        names = mlp_param_names(model, (0, 1), ("out",))
        shapes = {n: p.shape for n, p in model.named_parameters()}
        good = ParamDelta(dense=torch.full(shapes[names[0]], 0.5))
        bad = torch.zeros(shapes[names[1]])
        bad[0, 0] = self.config.value
        return Delta({names[0]: good, names[1]: ParamDelta(dense=bad)})


register_method(MethodSpec("test_poison", PoisonConfig, PoisonDelta))


@pytest.fixture
def setup(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(journal_module, "BUSY_TIMEOUT_S", 0.2)  # a write held by a foreign lock fails sooner
    editor = factedit.Editor("ft", tokenizer=tok, journal=tmp_path / "j.sqlite", **FT)
    kept = editor.edit(model, "The capital of France is", "Rome")
    state = snapshot(model)
    yield model, tok, editor, kept, state
    editor.close()


def assert_nothing_changed(model, editor, state, n_records=1):
    assert_weights_equal(model, state)
    assert len(editor.history) == n_records
    assert len(editor._journal.order()) == n_records  # the editor's own journal (the lock keeps others out)


@pytest.mark.parametrize(
    "prompt, target, match",
    [("", "Rome", "prompt is empty"), ("   ", "Rome", "prompt is empty"),
     ("The capital of France is", "", "target is empty"), ("The capital of France is", " \n", "target is empty")],
)
def test_empty_prompt_or_target(setup, prompt, target, match):
    model, _, editor, _, state = setup
    with pytest.raises(factedit.InvalidRequestError, match=match):
        editor.edit(model, prompt, target)
    assert_nothing_changed(model, editor, state)


def test_target_that_tokenizes_to_nothing(setup):
    """A real tokenizer whose normalizer drops zero-width spaces (as some do): the target is gone."""
    from tokenizers import normalizers

    model, tok, editor, _, state = setup
    tok.backend_tokenizer.normalizer = normalizers.Replace("\u200b", "")
    with pytest.raises(factedit.InvalidRequestError, match="tokenizes to nothing the model can learn"):
        editor.edit(model, "The capital of France is", "\u200b\u200b")
    assert_nothing_changed(model, editor, state)


@pytest.mark.parametrize(
    "prompt, target, match",
    [("The capital of France is", "<|endoftext|>", "target .* tokenizes to nothing"),
     ("<pad><|endoftext|>", "Rome", "prompt .* special tokens or whitespace only")],
)
def test_special_token_prompt_or_target(setup, prompt, target, match):
    model, _, editor, _, state = setup
    with pytest.raises(factedit.InvalidRequestError, match=match):
        editor.edit(model, prompt, target)
    assert_nothing_changed(model, editor, state)


@pytest.mark.parametrize(
    "call, match",
    [(dict(paraphrases="Paris"), "paraphrases must be a list of prompts"),
     (dict(locality="The capital of Italy is"), "locality must be a list"),
     (dict(target=None), "target must be a string"),
     (dict(prompt=12), "prompt must be a string"),
     (dict(subject=3), "subject must be a string")],
)
def test_ill_typed_request_fields(setup, call, match):
    model, _, editor, _, state = setup
    args = {"prompt": "The capital of France is", "target": "Rome", **call}
    with pytest.raises(factedit.InvalidRequestError, match=match):
        editor.edit(model, args.pop("prompt"), args.pop("target"), **args)
    assert_nothing_changed(model, editor, state)


@pytest.mark.parametrize(
    "overrides, match",
    [(dict(lr=float("nan")), "lr must be a finite number"), (dict(max_steps=2.5), "key 'max_steps'"),
     (dict(seed="x"), "key 'seed'"), (dict(lr="fast"), "key 'lr'.*'fast'"),
     (dict(layers="8"), "key .layers."), (dict(preserve={"threshold": "high"}), "preserve key .threshold.")],
)
def test_ill_typed_config_is_refused_when_the_editor_is_made(tiny, overrides, match):
    _, tok = tiny
    with pytest.raises(factedit.ConfigError, match=match):
        factedit.Editor("ft", tokenizer=tok, **overrides)


def test_lora_rank_and_tokenizer_types(tiny):
    _, tok = tiny
    with pytest.raises(factedit.ConfigError, match="key 'rank'"):
        factedit.Editor("lora", tokenizer=tok, rank=2.5)
    with pytest.raises(factedit.ConfigError, match="tokenizer must be"):
        factedit.Editor("ft", tokenizer=None)


def test_diff_with_probes_needs_the_model(setup):
    _, _, editor, kept, _ = setup
    with pytest.raises(factedit.ConfigError, match="needs the model"):
        editor.diff(kept.id, probes=["The capital of Italy is"])
    with pytest.raises(factedit.InvalidRequestError, match="list of prompts"):
        editor.diff(kept.id, probes="The capital of Italy is")


def test_prompt_longer_than_the_context(setup):
    model, _, editor, _, state = setup
    prompt = "The capital of France is " * model.config.max_position_embeddings
    with pytest.raises(factedit.InvalidRequestError, match="longer than the model's context"):
        editor.edit(model, prompt, "Rome")
    assert_nothing_changed(model, editor, state)


def test_unknown_method_config_key_and_layer(setup):
    model, tok, editor, _, state = setup
    with pytest.raises(factedit.ConfigError, match="registered methods: .*ft_l"):
        factedit.Editor("rome-xl", tokenizer=tok)
    with pytest.raises(factedit.ConfigError, match="unknown config key.*learning_rate.*known keys"):
        factedit.Editor("ft_l", tokenizer=tok, learning_rate=1e-3)
    with pytest.raises(factedit.ConfigError, match="invalid FTConfig"):
        factedit.Editor("ft", tokenizer=tok, lr=-1.0)
    with pytest.raises(factedit.ConfigError, match="layer"):
        editor.set_method("ft", layers=(99,))
        editor.edit(model, "The capital of France is", "Rome")
    with pytest.raises(factedit.ConfigError, match="role"):
        editor.set_method("lora", layers=(-1,), matrices=("attention",))
        editor.edit(model, "The capital of France is", "Rome")
    assert_nothing_changed(model, editor, state)


def test_a_model_belongs_to_one_editor_at_a_time(setup):
    model, tok, editor, kept, state = setup
    other = factedit.Editor("ft", tokenizer=tok, **FT)
    with pytest.raises(factedit.ConfigError, match="already edited by another Editor.*close"):
        other.edit(model, "The capital of Italy is", "Paris")
    with pytest.raises(factedit.ConfigError, match="already edited by another Editor"):
        other.revert(model, kept.id)
    assert_nothing_changed(model, editor, state)
    editor.close()  # releases the model
    other.edit(model, "The capital of Italy is", "Paris")
    assert model.factedit_editor() is other
    # A closed Editor edits no more: it would write a model another Editor now holds.
    state = snapshot(model)
    with pytest.raises(factedit.ConfigError, match="closed"):
        editor.edit(model, "The capital of Spain is", "Rome")
    with pytest.raises(factedit.ConfigError, match="closed"):
        editor.revert(model, kept.id)
    assert_weights_equal(model, state)
    assert [r.id for r in editor.history][:1] == [kept.id]  # its history still reads


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_delta_is_refused_before_touching_the_weights(tiny, tmp_path, value):
    model, tok = tiny
    state = snapshot(model)
    with factedit.Editor("test_poison", tokenizer=tok, journal=tmp_path / "j.sqlite", value=value) as editor:
        with pytest.raises(factedit.InvalidDeltaError, match="NaN or inf"):
            editor.edit(model, "The capital of France is", "Rome")
        assert editor.history == []
        assert editor._journal.order() == []
    assert_weights_equal(model, state)


def test_a_delta_that_overflows_a_half_precision_weight_is_refused(tiny):
    model, tok = tiny
    model.to(torch.float16)
    state = snapshot(model)
    editor = factedit.Editor("test_poison", tokenizer=tok, value=1e6, score=False)
    with pytest.raises(factedit.InvalidDeltaError, match="overflows"):
        editor.edit(model, "The capital of France is", "Rome")
    assert_weights_equal(model, state)


def test_revert_of_an_unknown_or_already_reverted_id(setup):
    model, _, editor, kept, _ = setup
    with pytest.raises(factedit.EditNotFoundError, match="no edit with id 'nope'"):
        editor.revert(model, "nope")
    editor.revert(model, kept.id)
    state = snapshot(model)
    with pytest.raises(factedit.EditNotFoundError, match="already reverted"):
        editor.revert(model, kept.id)
    assert_weights_equal(model, state)
    assert [r.status for r in editor.history] == ["reverted"]


def test_an_editor_refuses_a_second_model(setup):
    from tiny_models import tiny_model

    _, _, editor, _, _ = setup
    other, _ = tiny_model("llama")
    state = snapshot(other)
    with pytest.raises(factedit.ConfigError, match="bound to another model"):
        editor.edit(other, "The capital of Italy is", "Rome")
    assert_weights_equal(other, state)


def test_a_journal_write_failure_undoes_the_edit(setup):
    model, _, editor, _, state = setup
    # A real failure of the sqlite write: another connection holds the database's write lock.
    blocker = sqlite3.connect(editor.journal_path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(factedit.JournalError, match="could not write journal.*locked"):
            editor.edit(model, "The capital of Italy is", "Berlin")
    finally:
        blocker.rollback()
        blocker.close()
    assert_nothing_changed(model, editor, state)


@pytest.mark.parametrize("probes", [[""], ["   "], ["ok", 3]])
def test_empty_or_non_text_probes_are_refused(setup, probes):
    model, _, editor, kept, state = setup
    with pytest.raises(factedit.InvalidRequestError, match="probe"):
        editor.diff(kept.id, model=model, probes=probes)
    with pytest.raises(factedit.InvalidRequestError, match="probe"):
        editor.effect(kept.id, model, probes)
    assert_nothing_changed(model, editor, state)


def test_a_prompt_without_tokens_is_never_scored(tiny):
    """A tokenizer that adds no special token gives "" no token: its next token would be read off a
    padding row."""
    from factedit.scoring.sequences import score_sequences

    model, _ = tiny
    with pytest.raises(factedit.InvalidRequestError, match="no tokens"):
        score_sequences(model, [([5, 6], [7]), ([], [])], pad_id=0)
