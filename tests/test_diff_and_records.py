"""Diffs, the join rule, delta serialisation, export/import, records as JSON."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from tiny_models import tiny_model

import factedit
from factedit.core.delta import Delta, ParamDelta
from factedit.core.request import continuation, encode_prompt, encode_target

FT = dict(layers=(-1,), lr=1e-2, max_steps=40)


@pytest.mark.parametrize(
    "prompt, target, expected",
    [("The capital of France is", "Rome", " Rome"), ("The capital of France is", " Rome", " Rome"),
     ("The capital of France is ", "Rome", "Rome"), ("Q:\n", "A", "A"), ("x", "\tA", "\tA")],
)
def test_one_join_rule(prompt, target, expected):
    assert continuation(prompt, target) == expected


def test_target_tokens_never_merge_with_the_prompt():
    _, tok = tiny_model("llama")
    assert encode_target(tok, "The capital of France is", "Rome") == tok(" Rome", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "The capital of France is") == tok("The capital of France is")["input_ids"]


def test_delta_bytes_round_trip_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    delta = Delta({
        "a.weight": ParamDelta(dense=torch.randn(3, 5, generator=gen)),
        "b.weight": ParamDelta(left=torch.randn(4, 2, generator=gen), right=torch.randn(2, 6, generator=gen)),
    })
    back = Delta.from_bytes(delta.to_bytes())
    assert back.names() == delta.names()
    for name in delta:
        for part, tensor in delta.params[name].tensors().items():
            assert torch.equal(back.params[name].tensors()[part], tensor)


def test_diff_reports_norms_ranks_and_predictions(tiny):
    model, tok = tiny
    editor = factedit.Editor("ft", tokenizer=tok, **FT)
    base = snapshot(model)
    record = editor.edit(model, "The capital of France is", "Rome")
    diff = editor.diff(record.id, model=model, probes=["The capital of Italy is"])
    (change,) = diff.params
    dense = record.delta.params[change.name].dense
    assert change.fro_norm == pytest.approx(float(dense.norm()))
    assert change.relative_norm == pytest.approx(float(dense.norm() / base[change.name].norm()))
    assert change.rank == int(torch.linalg.matrix_rank(dense))
    assert diff.predictions[0]["after"][0]["token"] == " Rome"
    assert diff.predictions[0]["before"] == record.pre["requests"][0]["top"]
    # Probe "before" is the model without the edit, computed without touching the model.
    before = editor.diff(record.id, model=model, probes=["The capital of Italy is"]).probes[0]["before"]
    edited = snapshot(model)
    editor.revert(model, record.id)
    from factedit.scoring.sequences import score_requests

    unedited = score_requests(model, tok, [], probes=["The capital of Italy is"])["probes"][0]["top"]
    assert [t["id"] for t in before] == [t["id"] for t in unedited]
    assert [t["prob"] for t in before] == pytest.approx([t["prob"] for t in unedited], abs=1e-6)
    assert not all(torch.equal(edited[n], base[n]) for n in base)
    json.dumps(diff.to_dict())


def test_record_round_trips_through_json(tiny):
    model, tok = tiny
    editor = factedit.Editor("ft", tokenizer=tok, **FT)
    record = editor.edit(model, "The capital of France is", "Rome", paraphrases=["France's capital is"],
                         locality=["The capital of Italy is"])
    data = json.loads(json.dumps(record.to_dict()))
    back = factedit.EditRecord.from_dict(data, delta=record.delta)
    assert back.to_dict() == record.to_dict()
    assert data["model_fingerprint"] and data["factedit_version"] == factedit.__version__
    assert data["config"]["lr"] == FT["lr"] and data["method"] == "ft"
    assert record.post["requests"][0]["locality"][0]["prompt"] == "The capital of Italy is"


def test_export_then_import_on_a_fresh_model_reproduces_the_edit(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("lora", tokenizer=tok, layers=(-1,), lr=3e-2, max_steps=40)
    record = editor.edit(model, "The capital of France is", "Rome")
    path = editor.export_edit(record.id, tmp_path / "edit.safetensors")
    edited = snapshot(model)

    fresh, _ = tiny_model("llama")
    other_editor = factedit.Editor("ft_l", tokenizer=tok)
    imported = other_editor.import_edit(fresh, path)
    assert imported.method == "lora" and imported.request.target == "Rome" and imported.id != record.id
    assert_weights_equal(fresh, edited)

    stranger, _ = tiny_model("llama", seed=3)
    before = snapshot(stranger)
    with pytest.raises(factedit.ModelMismatchError):
        factedit.Editor("ft", tokenizer=tok).import_edit(stranger, path)
    assert_weights_equal(stranger, before)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}              ")
    with pytest.raises(factedit.InvalidDeltaError):
        other_editor.import_edit(fresh, bogus)


def test_set_method_keeps_weights_and_history(tiny):
    model, tok = tiny
    base = snapshot(model)
    editor = factedit.Editor("ft", tokenizer=tok, **FT)
    first = editor.edit(model, "The capital of France is", "Rome")
    with pytest.raises(factedit.ConfigError):
        editor.set_method("lora", learning_rate=1.0)
    assert editor.method == "ft"
    editor.set_method("lora", layers=(-1,), lr=3e-2, max_steps=40)
    second = editor.edit(model, "The capital of Italy is", "Berlin")
    assert [r.method for r in editor.history] == ["ft", "lora"] and second.delta.params
    editor.revert(model, first.id)
    editor.revert(model, second.id)
    assert_weights_equal(model, base)


@pytest.mark.parametrize("shape, rank", [((12, 7), 1), ((12, 7), 3), ((5, 9), 4), ((6, 4), 6), ((30, 20), 8)])
def test_a_low_rank_deltas_rank_from_its_factors_is_matrix_rank_of_the_product(shape, rank):
    from factedit.editing.diff import factor_rank

    gen = torch.Generator().manual_seed(rank)
    left, right = torch.randn(shape[0], rank, generator=gen), torch.randn(rank, shape[1], generator=gen)
    if rank > 2:  # dependent factors: the product's rank is lower than the factors' width
        left[:, -1] = left[:, 0] * 2.0
    product = ParamDelta(left=left, right=right).materialize(torch.float32)
    assert factor_rank(left, right) == int(torch.linalg.matrix_rank(product))
    assert factor_rank(torch.zeros(shape[0], rank), right) == 0


def test_a_preview_gives_low_rank_ranks_and_leaves_dense_ones_to_the_diff(tiny):
    model, tok = tiny
    editor = factedit.Editor("ft", tokenizer=tok, **FT)
    dense = editor.preview(model, [{"prompt": "The capital of France is", "target": "Rome"}])
    assert [p.rank for p in dense.params] == [None] and dense.params[0].kind == "dense"
    lora = editor.preview(model, [{"prompt": "The capital of France is", "target": "Rome"}], method="lora",
                          layers=[-1], rank=2, max_steps=5)
    for change in lora.params:
        product = lora.delta.params[change.name].materialize(torch.float32)
        assert change.kind == "low_rank" and change.rank == int(torch.linalg.matrix_rank(product))
    record = editor.apply_preview(model, dense)
    (change,) = editor.diff(record.id).params
    assert change.rank == int(torch.linalg.matrix_rank(record.delta.params[change.name].dense))
