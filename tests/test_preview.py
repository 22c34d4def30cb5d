"""Editor.preview / apply_preview / effect: an edit computed and scored with the weights untouched, then
applied exactly as previewed; what an edit does, also once reverted; the fine-tuning progress callback."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import factedit
from factedit.editing.preview import EDIT, PROBE

PROMPT, TARGET = "The capital of France is", "Rome"
PROBES = ["The capital of Germany is", "The capital of Italy is"]
SETTINGS = {"layers": [-1], "lr": 0.1, "max_steps": 10}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(model, weights: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters())
    return params.keys() == weights.keys() and all(torch.equal(params[n], w) for n, w in weights.items())


@pytest.mark.parametrize("method, settings",
                         [("ft_l", {**SETTINGS, "norm_constraint": 0.1}), ("lora", {"layers": [-1]})])
def test_preview_leaves_the_weights_untouched_and_apply_gives_the_same_edit(method, settings):
    model, tok = tiny_model("llama")
    twin, _ = tiny_model("llama")
    base = snapshot(model)
    editor = factedit.Editor(method, tokenizer=tok, **settings)
    preview = editor.preview(model, [{"prompt": PROMPT, "target": TARGET}], probes=PROBES)
    assert same(model, base)  # nothing written, no module left behind (lora injects and unloads one)
    assert editor.history == []
    assert preview.method == method and preview.weights == () and preview.timings["compute_ms"] > 0
    assert [r["kind"] for r in preview.rows] == [EDIT, PROBE, PROBE]
    assert preview.layers == (3,) and preview.norm > 0 and preview.params

    record = editor.apply_preview(model, preview)
    assert all(torch.equal(record.delta.params[n].materialize(torch.float32), p.materialize(torch.float32))
               for n, p in preview.delta.items())
    # Exactly what an edit with the same settings gives on an identical model: the compute is the same path.
    other = factedit.Editor(method, tokenizer=tok, **settings)
    other.edit(twin, PROMPT, TARGET)
    assert same(model, snapshot(twin))
    # The preview's scores are those the record measured once applied.
    post = record.post["requests"][0]
    assert preview.p_new == pytest.approx(post["target_prob"], abs=1e-5)
    assert preview.p_old == pytest.approx(post["old_answer"]["prob"], abs=1e-5)
    assert [t["id"] for t in preview.edit_row["after"]] == [t["id"] for t in post["top"]]

    editor.revert(model, record.id)
    assert same(model, base)


def test_preview_with_another_method_keeps_the_editors_own():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft_l", tokenizer=tok, **SETTINGS)
    preview = editor.preview(model, [{"prompt": PROMPT, "target": TARGET}], method="ft", **SETTINGS)
    assert preview.method == "ft" and preview.config["norm_constraint"] is None
    assert editor.method == "ft_l"
    record = editor.apply_preview(model, preview)
    assert record.method == "ft" and editor.history[-1].method == "ft"
    with pytest.raises(factedit.ConfigError, match="unknown config key"):
        editor.preview(model, [{"prompt": PROMPT, "target": TARGET}], method="ft", bogus=1)


def test_a_stale_preview_is_refused_and_changes_nothing():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, **SETTINGS)
    preview = editor.preview(model, [{"prompt": PROMPT, "target": TARGET}])
    editor.edit(model, "The capital of Italy is", "Paris")
    weights = snapshot(model)
    with pytest.raises(factedit.ConfigError, match="weights changed"):
        editor.apply_preview(model, preview)
    assert same(model, weights) and len(editor.history) == 1


def test_effect_of_a_reverted_edit_is_what_it_did():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, **SETTINGS)
    record = editor.edit(model, PROMPT, TARGET)
    active = editor.effect(record.id, model, probes=PROBES)
    weights = snapshot(model)
    assert same(model, weights)
    editor.revert(model, record.id)
    base = snapshot(model)
    reverted = editor.effect(record.id, model, probes=PROBES)
    assert same(model, base)
    assert active["active"] and not reverted["active"]
    for a, r in zip(active["rows"], reverted["rows"], strict=True):  # same columns: it did what it does
        assert [t["id"] for t in a["before"]] == [t["id"] for t in r["before"]]
        assert [t["id"] for t in a["after"]] == [t["id"] for t in r["after"]]
        assert a["shift"] == pytest.approx(r["shift"], abs=1e-5)
    edit_row = reverted["rows"][0]
    assert edit_row["after"][0]["token"] == " Rome" and edit_row["before"][0]["token"] != " Rome"
    assert edit_row["flipped"] and edit_row["target_after"] > edit_row["target_before"]


def test_shift_flags_a_change_that_is_not_a_flip():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, **SETTINGS)
    preview = editor.preview(model, [{"prompt": PROMPT, "target": TARGET}], probes=PROBES)
    for row in preview.rows:
        token = row["shift_token"]
        assert row["shift"] == pytest.approx(token["after"] - token["before"], abs=1e-5)
        assert abs(row["shift"]) >= abs(row["old"]["after"] - row["old"]["before"]) - 1e-6


def test_progress_is_reported_by_the_fine_tuning_loop():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, layers=[-1], lr=1e-3, max_steps=4)
    seen = []
    editor.progress = lambda step, total, loss: seen.append((step, total, loss))
    editor.edit(model, PROMPT, TARGET)
    assert [s[:2] for s in seen] == [(i, 4) for i in range(len(seen))] and len(seen) >= 2
    assert all(loss > 0 for *_, loss in seen)
    seen.clear()
    editor.preview(model, [{"prompt": PROMPT, "target": "Berlin"}], method="lora", layers=[-1], max_steps=3)
    assert seen and seen[-1][1] == 3
