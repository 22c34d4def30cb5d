"""Passes that start at a block from its cached input (replay.py), and the guard reads that use them."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from tiny_models import ARCHS, tiny_model

import factedit
from factedit.model.replay import capture_block_input, start_at_block
from factedit.model.specs import blocks, mlp_param_names
from factedit.safety.drift import DriftGuard, GuardConfig, reference_perplexity
from factedit.safety.guard_store import GuardStore
from factedit.safety.reference import reference_texts
from factedit.scoring.sequences import pad_sequences


def batch(tok, n: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    ids, mask = pad_sequences([tok(t).input_ids[: length - i] for i, t in enumerate(reference_texts("samples")[:n])],
                              tok.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


def bump(model, name: str, scale: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Add noise to one parameter; returns its value before."""
    param = dict(model.named_parameters())[name]
    before = param.detach().clone()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        param.add_(scale * torch.randn(param.shape, generator=g))
    return before


@pytest.mark.parametrize("arch", ARCHS)
def test_a_pass_from_a_cached_block_input_equals_the_full_pass(arch):
    model, tok = tiny_model(arch)
    inputs = batch(tok)  # padded rows: the mask matters above the replayed blocks
    with torch.no_grad(), capture_block_input(model, 2) as captured:
        model(**inputs)
    assert captured.hidden is not None and captured.form != "unknown"
    bump(model, mlp_param_names(model, 3, "out")[0])  # an edit above the cached block
    with torch.no_grad():
        full = model(**inputs).logits
        with start_at_block(model, 2, captured.hidden, captured.form):
            replayed = model(**inputs).logits
    assert torch.equal(replayed, full)
    assert all(type(b).__name__ != "_StandIn" for b in blocks(model))  # the blocks are back


def test_the_blocks_come_back_when_the_pass_fails(tiny):
    model, _ = tiny
    originals = list(blocks(model))
    with pytest.raises(RuntimeError), start_at_block(model, 2, torch.zeros(1, 3, 32), None):
        raise RuntimeError("boom")
    assert list(blocks(model)) == originals
    with pytest.raises(ValueError, match="block 1 or above"), start_at_block(model, 0, torch.zeros(1, 3, 32), None):
        pass


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    return tmp_path


def store_for(model, config: GuardConfig, fingerprint: str = "tiny") -> GuardStore:
    return GuardStore(fingerprint, "tiny-llama", reference_texts("samples"), config.texts, config.max_tokens,
                      torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_guard_reads_from_a_block_give_the_full_pass_ratio(arch, cache):
    model, tok = tiny_model(arch)
    config = GuardConfig(texts=4, max_tokens=16)
    name = mlp_param_names(model, 3, "out")[0]
    base = {name: bump(model, name)}
    fast, full = DriftGuard(config, store_for(model, config)), DriftGuard(config)
    for _ in range(3):
        assert fast.ratio(model, tok, base, start_layer=3) == full.ratio(model, tok, base)
    assert fast._forms[3] != "not replayable"
    group = fast.groups[0]
    assert 3 in group.hidden
    assert group.last == reference_perplexity(model, tok, group.texts, max_tokens=16) / group.base


def test_a_fresh_guard_takes_base_perplexities_and_block_inputs_from_the_store(cache, monkeypatch):
    model, tok = tiny_model("llama")
    config = GuardConfig(texts=4, max_tokens=16)
    name = mlp_param_names(model, 3, "out")[0]
    base = {name: bump(model, name)}
    first = DriftGuard(config, store_for(model, config))
    expected = first.ratio(model, tok, base, start_layer=3)
    path = store_for(model, config).folder / "group-0.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["model_fingerprint"] == "tiny" and set(handle.keys()) == {"base_perplexity", "block.3"}

    calls = []
    real = DriftGuard._perplexity

    def counting(self, model, group, params, layer):
        calls.append((params is not None and bool(params), layer in self._forms and layer in group.hidden))
        return real(self, model, group, params, layer)

    monkeypatch.setattr(DriftGuard, "_perplexity", counting)
    second = DriftGuard(config, store_for(model, config))
    assert second.ratio(model, tok, base, start_layer=3) == pytest.approx(expected, rel=1e-6)
    assert calls == [(True, True), (False, True)]  # the replay check on base weights, then the read: no full pass


def test_a_store_that_does_not_match_the_model_is_caught_and_read_in_full(cache):
    model, tok = tiny_model("llama")
    config = GuardConfig(texts=4, max_tokens=16)
    DriftGuard(config, store_for(model, config)).ratio(model, tok, {}, start_layer=3)
    other, _ = tiny_model("llama", seed=1)  # another model under the same (wrong) fingerprint
    guard = DriftGuard(config, store_for(other, config))
    ratio = guard.ratio(other, tok, {}, start_layer=3)
    # The stored base perplexity was the first model's: it is computed again, not kept as the denominator.
    group = guard.groups[0]
    assert group.base == pytest.approx(reference_perplexity(other, tok, group.texts, max_tokens=16), rel=1e-6)
    assert ratio == pytest.approx(1.0, rel=1e-4)  # nothing edited
    # ...and stored again: a later guard reads this model's values from the block, not in full.
    again = DriftGuard(config, store_for(other, config))
    assert again.ratio(other, tok, {}, start_layer=3) == pytest.approx(1.0, rel=1e-4)
    assert again._forms[3] != "not replayable"


def test_an_editor_guard_starts_at_the_lowest_edited_block(tiny, cache):
    model, tok = tiny
    editor = factedit.Editor("ft", tokenizer=tok, guard=100.0, layers=(-1,), lr=1e-3, max_steps=2)
    editor.edit(model, "The capital of France is", "Rome")
    assert set(editor._safeguards.guard._forms) == {3}
    editor.set_method("ft", layers=(1,), lr=1e-3, max_steps=2)
    editor.edit(model, "The capital of Spain is", "Paris")
    assert set(editor._safeguards.guard._forms) == {1, 3}


@pytest.fixture
def replay_checks(monkeypatch) -> list[int]:
    """The block of every replay check the drift guard runs from here on."""
    checks: list[int] = []
    real = DriftGuard._check_replay
    monkeypatch.setattr(DriftGuard, "_check_replay", lambda self, *a: checks.append(a[-1]) or real(self, *a))
    return checks


def test_warm_guard_prepares_every_group_so_the_first_edit_reads_only_from_its_block(tiny, cache, monkeypatch,
                                                                                    replay_checks):
    model, tok = tiny
    editor = factedit.Editor("ft", tokenizer=tok, guard=100.0, layers=(2, 3), lr=1e-3, max_steps=2)
    editor.warm_guard(model)
    guard = editor._safeguards.guard
    assert all(g.base is not None and set(g.hidden) == {2} for g in guard.groups)
    assert len(list(guard.store.folder.glob("group-*.safetensors"))) == len(guard.groups)

    full_passes = []
    real = DriftGuard._perplexity

    def counting(self, model, group, params, layer):
        full_passes.append(layer is None or layer not in self._forms)
        return real(self, model, group, params, layer)

    monkeypatch.setattr(DriftGuard, "_perplexity", counting)
    assert replay_checks == [2]  # replay from block 2 checked while warming...
    editor.edit(model, "The capital of France is", "Rome")
    assert not any(full_passes)
    assert replay_checks == [2]  # ...not again in the first edit's time


def test_prepare_also_checks_higher_blocks_kept_in_the_store(cache, replay_checks):
    """A store from earlier processes may keep a group's input to a higher block; reads of edits above it
    start there, so warming checks it too and the first such edit runs no check."""
    model, tok = tiny_model("llama")
    config = GuardConfig(texts=4, max_tokens=16)
    DriftGuard(config, store_for(model, config)).ratio(model, tok, {}, start_layer=3)  # stores group 0's block 3
    guard = DriftGuard(config, store_for(model, config))
    guard.prepare(model, tok, {}, start_layer=1)
    assert set(guard._forms) == {1, 3} and set(guard.groups[0].hidden) == {1, 3}
    assert replay_checks[-2:] == [1, 3]  # both checked while warming
    warmed = len(replay_checks)
    name = mlp_param_names(model, 3, "out")[0]
    base = {name: bump(model, name)}
    assert guard.ratio(model, tok, base, start_layer=3) == DriftGuard(config).ratio(model, tok, base)
    assert replay_checks[warmed:] == []


def test_a_read_starts_at_the_highest_kept_block_at_or_below_the_lowest_edited_one(cache):
    model, tok = tiny_model("llama")
    config = GuardConfig(texts=4, max_tokens=16)
    guard = DriftGuard(config)
    guard.prepare(model, tok, {}, start_layer=1)
    name = mlp_param_names(model, 3, "out")[0]
    base = {name: bump(model, name)}
    assert guard.ratio(model, tok, base, start_layer=3) == DriftGuard(config).ratio(model, tok, base)
    assert set(guard.groups[0].hidden) == {1} and set(guard._forms) == {1}  # block 1's input served block 3


def test_a_damaged_store_file_is_recomputed_and_rewritten(cache, caplog):
    model, tok = tiny_model("llama")
    config = GuardConfig(texts=4, max_tokens=16)
    expected = DriftGuard(config, store_for(model, config)).ratio(model, tok, {}, start_layer=3)
    path = store_for(model, config).folder / "group-0.safetensors"
    path.write_bytes(b"not a safetensors file")
    guard = DriftGuard(config, store_for(model, config))
    assert guard.ratio(model, tok, {}, start_layer=3) == expected
    assert "ignoring the damaged cache file" in caplog.text
    assert store_for(model, config).load(0)[0] == pytest.approx(guard.groups[0].base)  # written again


def test_a_fresh_guard_starts_at_a_lower_block_kept_in_the_store(cache):
    model, tok = tiny_model("llama")
    config = GuardConfig(texts=4, max_tokens=16)
    DriftGuard(config, store_for(model, config)).prepare(model, tok, {}, start_layer=1)
    name = mlp_param_names(model, 3, "out")[0]
    base = {name: bump(model, name)}
    guard = DriftGuard(config, store_for(model, config))
    assert guard.ratio(model, tok, base, start_layer=3) == DriftGuard(config).ratio(model, tok, base)
    assert set(guard.groups[0].hidden) == {1}  # no full pass to capture block 3's input
