"""Side modules (core/side.py): edits that ADD a module, attached by hooks, removed by revert.

The invariant of exact revert holds for them: after any sequence of edits and reverts the model computes
(logits, `torch.equal`) exactly what a freshly loaded base with the active edits applied in order
computes, and its weights are those too. Journal, replay, export/import, preview, diff and the
refusals of LoRA/merged exports handle them.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_weights_equal, no_hooks, snapshot
from tiny_models import ARCHS, tiny_model

import factedit
from factedit.core.delta import Delta, ParamDelta
from factedit.core.errors import InvalidDeltaError, InvalidRequestError
from factedit.core.methods import MethodSpec, register_method
from factedit.core.side import SideModule
from factedit.model.hooks import forward_hooks
from factedit.model.specs import mlp_param_names
from factedit.model.views import read_view
from factedit.model.weights import WeightState, side_points

PROMPT, TARGET = "The capital of France is", "Rome"
PROBES = ["The capital of France is", "The capital of Italy is", "Water boils at one hundred"]


@dataclass(frozen=True)
class GivenDeltaConfig:
    pass


class GivenDelta:
    """A stand-in method: returns the delta the test puts in `next`."""

    def __init__(self, config: GivenDeltaConfig) -> None:
        self.next: Delta | None = None

    def compute(self, model, tokenizer, requests) -> Delta:
        return self.next


register_method(MethodSpec("test_given_delta", GivenDeltaConfig, GivenDelta))


def logits(model, tok, prompts=PROBES) -> torch.Tensor:
    ids = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits  # (B, T, V)


def mlp_inputs(model, tok, prompt: str, layer: int) -> torch.Tensor:
    """The input of block `layer`'s MLP at every position of `prompt`: (T, d)."""
    seen = {}
    point = side_points(model)[layer]
    hook = {point: lambda m, args: seen.setdefault("x", args[0].detach())}
    with forward_hooks(model, pre_hooks=hook), torch.no_grad():
        model(**tok(prompt, return_tensors="pt"))
    return seen["x"][0]


def random_delta(model, tok, seed: int) -> Delta:
    """A seeded delta: side modules of one or more types, sometimes with a weight change too. Codebook
    keys are real MLP inputs of the probes, so that they match (radius > 0) and change the logits."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    d, layers = model.config.hidden_size, len(side_points(model))
    modules = {}
    for kind in rng.sample(["codebook", "gated_neurons", "bottleneck", "bias"], rng.randint(1, 4)):
        layer = rng.randrange(layers)
        point = side_points(model)[layer]
        if kind == "codebook":
            keys = mlp_inputs(model, tok, rng.choice(PROBES), layer)[-2:]  # (2, d)
            tensors = {"keys": keys, "values": torch.randn(2, d, generator=gen), "radii": 0.05 * keys.norm(dim=-1)}
        elif kind == "gated_neurons":
            tensors = {"w_in": torch.randn(3, d, generator=gen), "b_in": torch.randn(3, generator=gen),
                       "w_out": torch.randn(3, d, generator=gen) * 0.1}
        elif kind == "bias":
            tensors = {"bias": torch.randn(d, generator=gen) * 0.1}
        else:
            tensors = {"down": torch.randn(4, d, generator=gen), "b_down": torch.zeros(4),
                       "up": torch.randn(d, 4, generator=gen) * 0.1, "b_up": torch.randn(d, generator=gen) * 0.01}
        modules[kind] = SideModule(kind, point, tensors, {"act": "gelu"} if kind == "bottleneck" else {})
    params = {}
    if rng.random() < 0.5:
        name = mlp_param_names(model, (rng.randrange(layers),), ("out",))[0]
        shape = dict(model.named_parameters())[name].shape
        params[name] = ParamDelta(dense=torch.randn(shape, generator=gen) * 1e-2)
    return Delta(params, modules)


def expected(arch: str, deltas: list[Delta]):
    """A freshly built base model with `deltas` applied in order: its logits and weights."""
    fresh, tok = tiny_model(arch)
    state = WeightState()
    for i, delta in enumerate(deltas):
        state.apply(fresh, str(i), delta)
    return logits(fresh, tok), snapshot(fresh)


@pytest.mark.parametrize("arch", ARCHS)
def test_any_sequence_of_side_edits_and_reverts_computes_base_plus_active_edits(arch):
    model, tok = tiny_model(arch)
    base_logits, base = logits(model, tok), snapshot(model)
    editor = factedit.Editor("test_given_delta", tokenizer=tok, score=False)
    rng = random.Random(arch)
    active: dict[str, Delta] = {}
    for step in range(10):
        if active and rng.random() < 0.4:
            edit_id = rng.choice(list(active))
            editor.revert(model, edit_id)
            del active[edit_id]
        else:
            editor._impl.next = random_delta(model, tok, rng.randrange(10_000))
            active[editor.edit(model, PROMPT, TARGET).id] = editor._impl.next
        want_logits, want_weights = expected(arch, list(active.values()))
        assert torch.equal(logits(model, tok), want_logits), f"step {step}"
        assert_weights_equal(model, want_weights)
    editor.revert_all(model)
    assert torch.equal(logits(model, tok), base_logits)
    assert_weights_equal(model, base)
    assert no_hooks(model)


def test_journal_replays_side_modules_and_reverts_them(tmp_path):
    model, tok = tiny_model("llama")
    base_logits = logits(model, tok)
    path = tmp_path / "edits.sqlite"
    editor = factedit.Editor("test_given_delta", tokenizer=tok, score=False, journal=path)
    ids = []
    for seed in (1, 2, 3):
        editor._impl.next = random_delta(model, tok, seed)
        ids.append(editor.edit(model, PROMPT, TARGET).id)
    editor.revert(model, ids[1])
    edited = logits(model, tok)
    editor.close()

    fresh, tok2 = tiny_model("llama")
    reopened = factedit.Editor("test_given_delta", tokenizer=tok2, score=False, journal=path)
    reopened.attach(fresh)
    assert torch.equal(logits(fresh, tok2), edited)
    assert reopened.diff(ids[0]).modules  # the diff lists the modules it adds
    reopened.revert_all(fresh)
    assert torch.equal(logits(fresh, tok2), base_logits)
    reopened.close()


def test_export_and_import_of_one_side_edit(tmp_path):
    model, tok = tiny_model("gpt2")
    editor = factedit.Editor("test_given_delta", tokenizer=tok, score=False)
    editor._impl.next = random_delta(model, tok, 7)
    record = editor.edit(model, PROMPT, TARGET)
    edited = logits(model, tok)
    path = editor.export_edit(record.id, tmp_path / "edit.safetensors")

    fresh, tok2 = tiny_model("gpt2")
    base_logits = logits(fresh, tok2)
    other = factedit.Editor("test_given_delta", tokenizer=tok2, score=False)
    imported = other.import_edit(fresh, path)
    assert torch.equal(logits(fresh, tok2), edited)
    other.revert(fresh, imported.id)
    assert torch.equal(logits(fresh, tok2), base_logits)


def test_lora_and_merged_exports_refuse_side_edits_and_write_nothing(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("test_given_delta", tokenizer=tok, score=False)
    editor._impl.next = Delta({}, random_delta(model, tok, 3).modules)
    editor.edit(model, PROMPT, TARGET)
    before = logits(model, tok)
    for call in (lambda: editor.export_adapter(tmp_path / "peft", rank=4),
                 lambda: editor.export_adapter(tmp_path / "gguf", format="gguf", rank=4),
                 lambda: editor.export_merged(model, tmp_path / "merged")):
        with pytest.raises(InvalidRequestError, match="side modules"):
            call()
    assert not any(tmp_path.iterdir())
    assert torch.equal(logits(model, tok), before)


def side(kind="codebook", point=None, d=32, **changes):
    tensors = {"keys": torch.zeros(1, d), "values": torch.zeros(1, d), "radii": torch.ones(1)}
    tensors.update(changes)
    return SideModule(kind, point or "model.layers.1.mlp", tensors)


def test_bad_side_modules_are_refused_before_anything_changes():
    model, tok = tiny_model("llama")
    before, weights = logits(model, tok), snapshot(model)
    with pytest.raises(InvalidDeltaError, match="unknown side module type"):
        side("exec_this")
    with pytest.raises(InvalidDeltaError, match="inconsistent"):
        side(values=torch.zeros(2, 32))
    with pytest.raises(InvalidDeltaError, match="NaN"):
        side(values=torch.full((1, 32), float("nan")))
    with pytest.raises(InvalidDeltaError, match="needs tensors"):
        SideModule("codebook", "model.layers.1.mlp", {"keys": torch.zeros(1, 32)})
    with pytest.raises(InvalidDeltaError, match="dims"):
        SideModule("bias", "model.layers.1.mlp", {"bias": torch.zeros(1, 32)})
    name = mlp_param_names(model, (0,), ("out",))[0]
    good_param = {name: ParamDelta(dense=torch.ones_like(dict(model.named_parameters())[name]))}
    state = WeightState()
    for bad in (side(point="model.layers.1.mlp.down_proj"), side(point="model.layers.9.mlp"), side(d=16)):
        with pytest.raises(InvalidDeltaError):
            state.apply(model, "x", Delta(good_param, {"m": bad}))
    assert torch.equal(logits(model, tok), before)
    assert_weights_equal(model, weights)
    assert not state.active and no_hooks(model)


def test_blobs_without_side_modules_read_as_before_and_unknown_formats_are_refused():
    model, tok = tiny_model("llama")
    delta = random_delta(model, tok, 11)
    blob = delta.to_bytes()
    again = Delta.from_bytes(blob)
    assert list(again.modules) == list(delta.modules)
    for name, module in delta.modules.items():
        assert all(torch.equal(module.tensors[k], again.modules[name].tensors[k]) for k in module.tensors)
    plain = Delta(random_delta(model, tok, 12).params or {
        mlp_param_names(model, (0,), ("out",))[0]: ParamDelta(dense=torch.zeros(32, 64))})
    meta = json.loads(plain.to_bytes()[8:8 + int.from_bytes(plain.to_bytes()[:8], "little")])["__metadata__"]
    assert meta["format"] == "factedit.delta/1" and "side" not in meta  # older readers read it
    assert not Delta.from_bytes(plain.to_bytes()).modules
    with pytest.raises(InvalidDeltaError, match="format"):
        Delta.from_bytes(delta.to_bytes({"side_format": "factedit.side/99"}))


def test_preview_effect_and_views_leave_the_model_and_its_hooks_as_they_were():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("test_given_delta", tokenizer=tok)
    editor._impl.next = random_delta(model, tok, 5)
    first = editor.edit(model, PROMPT, TARGET)
    current = logits(model, tok)
    editor._impl.next = Delta({}, random_delta(model, tok, 6).modules)
    preview = editor.preview(model, [{"prompt": PROMPT, "target": TARGET}], probes=PROBES)
    assert preview.rows and torch.equal(logits(model, tok), current)
    for target in (model, read_view(model)):
        effect = editor.effect(first.id, target, PROBES)
        assert effect["active"] and torch.equal(logits(model, tok), current)
        assert any(row["flipped"] or row["shift"] for row in effect["rows"])
    with pytest.raises(InvalidRequestError, match="side modules"):
        editor.toggled_weights(first.id, model)
    record = editor.apply_preview(model, preview)
    editor.revert(model, record.id)
    assert torch.equal(logits(model, tok), current)


def greedy_ids(model, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation recomputed from the whole sequence at every step (no cache, no padding)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def test_the_sessions_batched_generation_sees_a_side_edit_as_a_plain_forward_does():
    from factedit.session.generation import BatchGenerator
    from factedit.session.generation_types import SamplingParams

    model, tok = tiny_model("llama")
    editor = factedit.Editor("grace", tokenizer=tok, layer=-1)
    record = editor.edit(model, PROMPT, TARGET)
    assert record.post["requests"][0]["target_is_argmax"]
    prompts = [PROMPT, "Water boils at one hundred degrees and the quick brown fox"]  # padded together
    gen = BatchGenerator(model, tok, lambda: contextlib.nullcontext(), max_batch=4, gather_s=0.2)
    try:
        handles = [gen.submit(tok(p)["input_ids"], SamplingParams(max_tokens=4, temperature=0)) for p in prompts]
        for prompt, handle in zip(prompts, handles, strict=True):
            ids = [t.id for t in handle.result(timeout=60).tokens]
            assert ids == greedy_ids(model, tok(prompt)["input_ids"], len(ids))
        first = handles[0].result().tokens[0].id
        assert first == tok(" " + TARGET)["input_ids"][0]
    finally:
        gen.close()
