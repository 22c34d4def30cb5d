"""apply_preview takes over what its preview measured (the record's scores, the drift guard's reading)
only while the weights are exactly those it was measured on; the record and the journal are what a
direct edit gives; the guard still refuses from the preview's reading, changing nothing."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from tiny_models import tiny_model
from wreck import WRECK

import factedit
from factedit.core.errors import DriftError
from factedit.editing.journal import Journal
from factedit.safety.drift import DriftGuard

PROMPT, TARGET = "The capital of France is", "Rome"
FACT = {"prompt": PROMPT, "target": TARGET, "paraphrases": ["France's capital is"],
        "locality": ["The capital of Spain is"]}
SETTINGS = {"layers": [-1], "lr": 0.1, "max_steps": 10, "guard": 3.0}


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """Every group the drift guard reads on a model (one entry per read)."""
    seen: list[int] = []
    original = DriftGuard._read

    def counted(self, model, tokenizer, index, *args):
        seen.append(index)
        return original(self, model, tokenizer, index, *args)

    monkeypatch.setattr(DriftGuard, "_read", counted)
    return seen


def comparable(record: factedit.EditRecord) -> dict:
    """A record's journaled fields, less those that differ between any two edits (id, time, timings)."""
    fields = record.to_dict()
    for key in ("id", "created_at", "timings"):
        fields.pop(key)
    return fields


@pytest.mark.parametrize("method, settings", [("ft", SETTINGS), ("ft_l", {**SETTINGS, "norm_constraint": 0.1})])
def test_preview_then_apply_journals_what_a_direct_edit_journals(tmp_path, reads, monkeypatch, method, settings):
    """ft_l preserves keys: the keys the apply protects (from the preview) shape the next edit's delta."""
    from factedit.safety import safeguards

    keys: list[int] = []
    original = safeguards.edit_keys
    monkeypatch.setattr(safeguards, "edit_keys", lambda *a, **k: keys.append(1) or original(*a, **k))
    model, tok = tiny_model("llama")
    twin, _ = tiny_model("llama")
    with factedit.Editor(method, tokenizer=tok, journal=tmp_path / "a.sqlite", **settings) as editor:
        preview = editor.preview(model, [FACT], probes=["The capital of Italy is"])
        assert preview.drift is not None and preview.max_drift == 3.0 and not preview.guard_refuses
        read_by_preview, keys_by_preview = len(reads), len(keys)
        applied = editor.apply_preview(model, preview)
        assert len(reads) == read_by_preview and len(keys) == keys_by_preview  # the apply read nothing again
        assert read_by_preview > 0 and keys_by_preview == (method == "ft_l")
        later = editor.edit(model, "The capital of Italy is", "Paris")
    with factedit.Editor(method, tokenizer=tok, journal=tmp_path / "b.sqlite", **settings) as editor:
        direct = editor.edit(twin, **FACT)
        direct_later = editor.edit(twin, "The capital of Italy is", "Paris")
    assert_weights_equal(model, snapshot(twin))
    assert applied.drift == direct.drift and applied.pre == direct.pre and applied.post == direct.post
    assert comparable(applied) == comparable(direct) and comparable(later) == comparable(direct_later)
    assert applied.timings.keys() == direct.timings.keys()
    with Journal(tmp_path / "a.sqlite") as a, Journal(tmp_path / "b.sqlite") as b:
        ours, theirs = a.records(), b.records()
    assert [comparable(r) for r in ours] == [comparable(r) for r in theirs]
    for one, two in zip(ours, theirs, strict=True):
        assert all(torch.equal(one.delta.params[n].materialize(torch.float32), p.materialize(torch.float32))
                   for n, p in two.delta.items())


def test_the_reading_is_not_reused_once_the_weights_changed(reads):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, **SETTINGS)
    preview = editor.preview(model, [FACT])
    param = dict(model.named_parameters())["lm_head.weight"]
    with torch.no_grad():
        param.mul_(1.0)  # a write from outside the Editor, even one that leaves the values as they were
    before = len(reads)
    record = editor.apply_preview(model, preview)
    assert len(reads) > before  # measured afresh
    assert record.timings["guard_ms"] > 0 and record.drift is not None


def test_a_preview_reading_does_not_move_the_guard():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, **SETTINGS)
    editor.edit(model, "The capital of Italy is", "Paris")  # a first check: group 0 read
    guard = editor._safeguards.guard
    plan, lasts = guard.plan(), [g.last for g in guard.groups]
    editor.preview(model, [FACT])
    assert guard.plan() == plan and [g.last for g in guard.groups] == lasts
    editor.preview(model, [FACT])  # and again: the same groups
    assert guard.plan() == plan


def test_a_refusal_read_by_the_preview_changes_nothing(tmp_path, reads):
    model, tok = tiny_model("llama")
    base = snapshot(model)
    path = tmp_path / "j.sqlite"
    with factedit.Editor(WRECK, tokenizer=tok, journal=path, guard=1.5) as editor:
        preview = editor.preview(model, [FACT])
        assert preview.guard_refuses and preview.drift > 1.5
        assert preview.to_dict()["drift"] == preview.drift
        read_by_preview = len(reads)
        with pytest.raises(DriftError, match="perplexity of the reference text") as caught:
            editor.apply_preview(model, preview)
        assert len(reads) == read_by_preview and caught.value.ratio == preview.drift
        assert_weights_equal(model, base)
        assert editor.history == []
    with factedit.Editor(WRECK, tokenizer=tok, journal=path) as reopened:
        assert reopened.history == []


def test_without_the_guard_a_preview_reads_no_drift(reads):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, layers=[-1], lr=0.1, max_steps=10)
    preview = editor.preview(model, [FACT])
    assert preview.drift is None and preview.max_drift is None and not preview.guard_refuses and reads == []
    record = editor.apply_preview(model, preview)
    assert record.drift is None and "guard_ms" not in record.timings


def test_the_weights_scores_before_a_delta_are_kept_per_weights(monkeypatch):
    from factedit.editing import preview as preview_module

    calls: list[int] = []
    original = preview_module._score
    monkeypatch.setattr(preview_module, "_score", lambda *a: calls.append(1) or original(*a))
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, layers=[-1], lr=0.1, max_steps=10)
    one = editor.preview(model, [FACT], probes=["The capital of Italy is"])
    two = editor.preview(model, [FACT], probes=["The capital of Italy is"], method="lora", layers=[-1], max_steps=3)
    assert len(calls) == 3  # before once, after twice
    assert [r["before"] for r in one.rows] == [r["before"] for r in two.rows]
    editor.preview(model, [FACT], probes=["The capital of Spain is"])  # other prompts: scored
    assert len(calls) == 5
    editor.apply_preview(model, one)
    calls.clear()
    editor.preview(model, [FACT], probes=["The capital of Italy is"])  # other weights: scored again
    assert len(calls) == 2
