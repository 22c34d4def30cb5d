"""Lifelong normalisation (`mend`, `ultraedit`): the statistics keep learning from each edit, live in
the Editor and its journal, and a reopened journal edits on bit for bit as the process that wrote it."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from test_mend import mend_editor, tiny_checkpoint
from tiny_models import tiny_model

import factedit
from factedit import EditRequest

TINY_ULTRAEDIT = dict(layers=(-1,), positions="all", step_scales=(1.0, 4.0, 16.0, 64.0), guard=None)
FACTS = [("The capital of France is", "Rome"), ("The capital of Germany is", "Paris"),
         ("The capital of Spain is", "Berlin")]


def counts(state: dict[str, torch.Tensor]) -> list[float]:
    return [float(t) for name, t in sorted(state.items()) if name.endswith(".count")]


def assert_same_delta(a: factedit.EditRecord | factedit.EditPreview, b) -> None:
    assert a.delta.names() == b.delta.names()
    for name in a.delta.names():
        for part, tensor in a.delta.params[name].tensors().items():
            assert torch.equal(tensor, b.delta.params[name].tensors()[part]), (name, part)


def test_each_edit_merges_its_rows_into_the_statistics():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ultraedit", tokenizer=tok, **TINY_ULTRAEDIT)
    first = editor.edit(model, *FACTS[0])
    second = editor.edit(model, *FACTS[1])
    assert first.state is not None and second.state is not None
    n_first, n_second = counts(first.state)[0], counts(second.state)[0]
    assert n_first > 1 and n_second > n_first  # the second edit's rows joined the first's
    mean = next(name for name in first.state if name.endswith(".mean"))
    assert not torch.equal(first.state[mean], second.state[mean])


def test_a_preview_leaves_the_statistics_and_applying_it_keeps_what_it_computed():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ultraedit", tokenizer=tok, **TINY_ULTRAEDIT)
    editor.edit(model, *FACTS[0])
    preview = editor.preview(model, [EditRequest(*FACTS[1])])
    again = editor.preview(model, [EditRequest(*FACTS[1])])
    assert_same_delta(preview, again)  # the first preview advanced nothing
    record = editor.apply_preview(model, preview)
    assert counts(record.state) == counts(preview.stream_state)
    after = editor.preview(model, [EditRequest(*FACTS[2])])
    assert counts(after.stream_state)[0] > counts(record.state)[0]


def test_a_revert_keeps_the_statistics_and_restores_the_weights_exactly():
    model, tok = tiny_model("llama")
    base = snapshot(model)
    editor = factedit.Editor("ultraedit", tokenizer=tok, warmup=0, **TINY_ULTRAEDIT)
    first = editor.edit(model, *FACTS[0])
    editor.revert(model, first.id)
    assert_weights_equal(model, base)
    second = editor.edit(model, *FACTS[1])
    # the reverted edit's rows still count: statistics describe what the editor has seen
    fresh = factedit.Editor("ultraedit", tokenizer=tok, warmup=0, **TINY_ULTRAEDIT)
    alone = fresh.preview(tiny_model("llama")[0], [EditRequest(*FACTS[1])])
    assert counts(second.state)[0] == counts(first.state)[0] + counts(alone.stream_state)[0]


@pytest.mark.parametrize("method", ["ultraedit", "mend"])
def test_a_reopened_journal_gives_bit_for_bit_the_next_delta(method, tmp_path):
    model, tok = tiny_model("llama")

    def editor_for(journal):
        if method == "mend":
            path = tmp_path / "ck"
            if not path.exists():
                tiny_checkpoint(tmp_path, model)
            return mend_editor(tok, path, journal=journal, guard=None)
        return factedit.Editor(method, tokenizer=tok, journal=journal, **TINY_ULTRAEDIT)

    journal = tmp_path / "edits.sqlite"
    writer = editor_for(journal)
    kept = writer.edit(model, *FACTS[0])
    reverted = writer.edit(model, *FACTS[1])
    writer.revert(model, reverted.id)
    continued = writer.preview(model, [EditRequest(*FACTS[2])])  # the next delta in the same process
    writer.close()
    assert kept.state is not None

    fresh, _ = tiny_model("llama")
    reader = editor_for(journal)
    record = reader.edit(fresh, *FACTS[2])
    assert_same_delta(record, continued)
    assert all(torch.equal(record.state[k], continued.stream_state[k]) for k in record.state)
    reader.close()


def test_ultraedit_statistics_start_from_the_warmup_edits():
    model, tok = tiny_model("llama")
    request = [EditRequest(*FACTS[0])]
    cold = factedit.Editor("ultraedit", tokenizer=tok, warmup=0, **TINY_ULTRAEDIT).preview(model, request)
    warm = factedit.Editor("ultraedit", tokenizer=tok, warmup=4, **TINY_ULTRAEDIT).preview(model, request)
    assert counts(warm.stream_state)[0] > counts(cold.stream_state)[0] + 4  # every token of 4 edits


def test_mend_with_frozen_statistics_keeps_no_state(tmp_path):
    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model)
    frozen = mend_editor(tok, path, guard=None, lifelong=False).edit(model, *FACTS[0])
    assert frozen.state is None
    lifelong = mend_editor(tok, path, guard=None).edit(tiny_model("llama")[0], *FACTS[0])
    assert lifelong.state is not None


def test_ultraedit_without_a_null_space_is_the_plain_ridge_solve():
    """preserve=None: UltraEdit's own solve; each edited key maps to (nearly) its value."""
    model, tok = tiny_model("llama")
    base = snapshot(model)
    editor = factedit.Editor("ultraedit", tokenizer=tok, preserve=None, **TINY_ULTRAEDIT)
    record = editor.edit(model, *FACTS[0])
    assert record.post["requests"][0]["target_prob"] > record.pre["requests"][0]["target_prob"]
    editor.revert(model, record.id)
    assert_weights_equal(model, base)


@pytest.mark.parametrize("method", ["ultraedit", "mend"])
def test_prefixes_make_the_edit_in_every_context_and_revert_exactly(method, tmp_path):
    model, tok = tiny_model("llama")
    base = snapshot(model)
    prefixes = {"seeds": ["The", "I"], "per_seed": 1, "tokens": 4}

    def editor(**extra):
        if method == "mend":
            path = tmp_path / "ck"
            if not path.exists():
                tiny_checkpoint(tmp_path, model)
            return mend_editor(tok, path, guard=None, positions="all", **extra)
        return factedit.Editor(method, tokenizer=tok, warmup=0, **TINY_ULTRAEDIT, **extra)

    plain, prefixed = editor(), editor(prefixes=prefixes)
    alone = plain.preview(model, [EditRequest(*FACTS[0])])
    plain.close()
    record = prefixed.edit(model, *FACTS[0])
    # the statistics saw the rows of the prompt alone and of the two prefixed prompts (positions="all")
    assert counts(record.state)[0] > 2 * counts(alone.stream_state)[0]
    prefixed.revert(model, record.id)
    assert_weights_equal(model, base)


def test_prefixed_requests_keep_the_request_first_and_leave_out_what_does_not_fit():
    from factedit.core.request import tokenize_request
    from factedit.scoring.batches import prefixed_requests

    _, tok = tiny_model("llama")
    request = tokenize_request(EditRequest(*FACTS[0]), tok, None)
    out = prefixed_requests([request], tok, ("", "A short one", "A much longer prefix than the other one"))
    assert out[0] is request and len(out) == 3
    assert tok.decode(list(out[1].prompt_ids)).endswith(FACTS[0][0]) and out[1].target_ids == request.target_ids
    fits = len(out[1].prompt_ids) + len(request.target_ids)
    kept = prefixed_requests([request], tok, ("", "A short one", "A much longer prefix than the other one"), fits)
    assert [r.prompt_ids for r in kept] == [r.prompt_ids for r in out[:2]]
