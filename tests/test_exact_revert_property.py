"""Invariant 3 as a property: after any sequence of edits and reverts, every parameter equals, bit
for bit, the still-active deltas applied in order to the base weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from helpers import assert_weights_equal, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

import factedit
from factedit.core.delta import Delta, ParamDelta
from factedit.core.methods import MethodSpec, register_method
from factedit.model.specs import mlp_param_names


@dataclass(frozen=True)
class RandomDeltaConfig:
    scale: float = 1e-2


class RandomDelta:
    """A stand-in method: a seeded random delta on some MLP matrices, dense or low-rank. The test
    sets `next` = (seed, low_rank, indices into the MLP weight names) before each edit."""

    def __init__(self, config: RandomDeltaConfig) -> None:
        self.config = config
        self.next: tuple[int, bool, tuple[int, ...]] = (0, False, (0,))

    def compute(self, model, tokenizer, requests) -> Delta:
        return Delta({name: ParamDelta(**parts) for name, parts in random_parts(model, *self.next).items()})


def random_parts(model, seed: int, low_rank: bool, which: tuple[int, ...], scale: float = 1e-2):
    """name -> {"dense": ...} or {"left": ..., "right": ...}: the seeded random change of some MLP matrices."""
    names = mlp_param_names(model, (0, 1), ("gate", "in", "out"))
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    parts = {}
    for index in which:
        name = names[index % len(names)]
        rows, cols = shapes[name]
        if low_rank:
            parts[name] = {"left": torch.randn(rows, 2, generator=gen) * scale,
                           "right": torch.randn(2, cols, generator=gen)}
        else:
            parts[name] = {"dense": torch.randn(rows, cols, generator=gen) * scale}
    return parts


register_method(MethodSpec("test_random_delta", RandomDeltaConfig, RandomDelta))

MODEL, TOKENIZER = tiny_model("llama")
BASE = snapshot(MODEL)

operation = st.one_of(
    st.tuples(st.just("edit"), st.integers(0, 10_000), st.booleans(),
              st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("revert"), st.integers(0, 50)),
)


def expected_weights(active: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The base plus each active change in order, computed here from the test's own tensors (not by the
    code under test): a low-rank change is the float64 product cast to the weight's dtype (delta.py)."""
    weights = {n: t.clone() for n, t in BASE.items()}
    for parts in active:
        for name, part in parts.items():
            update = part["dense"] if "dense" in part else (part["left"].double() @ part["right"].double()).float()
            weights[name] += update
    return weights


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=12))
def test_any_edit_revert_sequence_equals_replaying_the_active_edits(operations):
    editor = factedit.Editor("test_random_delta", tokenizer=TOKENIZER, score=False)
    active: dict[str, dict] = {}  # the reference: edit id -> its change's parts, in order
    for op in operations:
        if op[0] == "edit":
            _, seed, low_rank, which = op
            editor._impl.next = (seed, low_rank, tuple(which))
            record = editor.edit(MODEL, "The capital of France is", "Rome")
            active[record.id] = random_parts(MODEL, seed, low_rank, tuple(which))
        elif active:
            edit_id = list(active)[op[1] % len(active)]
            editor.revert(MODEL, edit_id)
            del active[edit_id]
        assert_weights_equal(MODEL, expected_weights(list(active.values())))
    editor.revert_all(MODEL)
    editor.close()
    assert_weights_equal(MODEL, BASE)


# --- edits that add side modules (core/side.py), mixed with weight changes ------------------------------
side_operation = st.one_of(st.tuples(st.just("edit"), st.integers(0, 10_000)),
                           st.tuples(st.just("revert"), st.integers(0, 50)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(side_operation, min_size=1, max_size=8))
def test_any_sequence_with_side_modules_computes_the_base_plus_the_active_edits(operations):
    """The logits (and weights) after any sequence equal, `torch.equal`, those of a freshly built base model
    with the active edits applied in order (test_side_modules.py has the same over every architecture)."""
    from test_side_modules import PROBES, expected, logits, random_delta

    model, tok = tiny_model("llama")
    editor = factedit.Editor("test_given_delta", tokenizer=tok, score=False)
    active: dict[str, Delta] = {}
    for op in operations:
        if op[0] == "edit":
            editor._impl.next = random_delta(model, tok, op[1])
            active[editor.edit(model, PROBES[0], "Rome").id] = editor._impl.next
        elif active:
            edit_id = list(active)[op[1] % len(active)]
            editor.revert(model, edit_id)
            del active[edit_id]
        want_logits, want_weights = expected("llama", list(active.values()))
        assert torch.equal(logits(model, tok), want_logits)
        assert_weights_equal(model, want_weights)
    editor.revert_all(model)
    assert torch.equal(logits(model, tok), expected("llama", [])[0])
