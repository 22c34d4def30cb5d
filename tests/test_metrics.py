"""factedit.scoring.metrics: scores against hand computation on a tiny model, padding invariance, and
the aggregation formulas against hand-computed values."""

from __future__ import annotations

import contextlib
import math
import mmap

import pytest
import torch

from factedit.core.cost import PeakMemory
from factedit.core.request import encode_prompt, encode_target
from factedit.evaluation import EvalRecord
from factedit.scoring.metrics import (
    CaseScores,
    compute_metrics,
    generate_greedy,
    harmonic_mean,
    ngram_entropy,
    score_cases,
)
from factedit.scoring.targets import score_targets

CASE = EvalRecord(
    index=0,
    prompt="The capital of France is",
    target_new="Rome and Madrid",  # multi-token targets on both sides
    target_true="Paris, the city",
    paraphrases=("The capital city of France is", "Paris is the capital of"),
    neighborhood=(("The Eiffel Tower is in", "Paris"),),
    locality=(("Water boils at", "one hundred degrees"),),
)


def _by_hand(model, tok, prompt: str, target: str) -> tuple[float, float, list[int]]:
    """Mean NLL, argmax accuracy and argmax ids of `target` after `prompt`: one unpadded forward."""
    p, t = encode_prompt(tok, prompt), encode_target(tok, prompt, target)
    with torch.no_grad():
        logits = model(torch.tensor([p + t])).logits[0]  # (T, V)
    logprobs = torch.log_softmax(logits.double(), -1)[len(p) - 1 : len(p) - 1 + len(t)]  # (n, V)
    nll = -sum(float(logprobs[i, tok_id]) for i, tok_id in enumerate(t)) / len(t)
    argmax = logprobs.argmax(-1).tolist()
    return nll, sum(a == b for a, b in zip(argmax, t, strict=True)) / len(t), argmax


def test_case_scores_match_hand_computation(tiny):
    model, tok = tiny
    assert len(encode_target(tok, CASE.prompt, CASE.target_new)) > 1
    scores = score_cases(model, tok, [CASE], batch_size=4)[0]
    new = _by_hand(model, tok, CASE.prompt, CASE.target_new)
    true = _by_hand(model, tok, CASE.prompt, CASE.target_true)
    assert scores.new_nll == pytest.approx(new[0], abs=1e-5)
    assert scores.true_nll == pytest.approx(true[0], abs=1e-5)
    assert scores.new_acc == pytest.approx(new[1])
    for i, text in enumerate(CASE.paraphrases):
        assert scores.para_new_nll[i] == pytest.approx(
            _by_hand(model, tok, text, CASE.target_new)[0], abs=1e-5
        )
        assert scores.para_true_nll[i] == pytest.approx(
            _by_hand(model, tok, text, CASE.target_true)[0], abs=1e-5
        )
    ((n_prompt, n_answer),) = CASE.neighborhood
    assert scores.neigh_new_nll[0] == pytest.approx(
        _by_hand(model, tok, n_prompt, CASE.target_new)[0], abs=1e-5
    )
    assert scores.neigh_true_nll[0] == pytest.approx(_by_hand(model, tok, n_prompt, n_answer)[0], abs=1e-5)
    # locality argmax ids: the locality pair first, then the neighbourhood prompt with its answer
    assert scores.loc_pred == [
        _by_hand(model, tok, *CASE.locality[0])[2],
        _by_hand(model, tok, n_prompt, n_answer)[2],
    ]

    # ... and the metrics from those hand-computed numbers
    metrics = compute_metrics([scores], [scores])
    assert metrics["cf/es"] == float(new[0] < true[0])
    assert metrics["cf/em"] == pytest.approx(math.exp(-new[0]) - math.exp(-true[0]), abs=1e-7)
    assert metrics["tok/reliability"] == pytest.approx(new[1])
    assert metrics["tok/locality"] == 1.0  # unchanged model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_padding_matches_unbatched(arch, side):
    from tiny_models import tiny_model

    model, tok = tiny_model(arch)
    texts = [
        ("The capital of France is", "Rome"),
        ("Paris", "is the capital city of France and Italy"),
        ("The quick brown fox jumps over the lazy", "dog"),
        ("He was born in London and works in", "New York"),
    ]
    pairs = [(encode_prompt(tok, p), encode_target(tok, p, t)) for p, t in texts]
    assert len({len(p) + len(t) for p, t in pairs}) > 1  # lengths differ: padding happens
    alone = [score_targets(model, [pair], tok.pad_token_id)[0] for pair in pairs]
    batched = score_targets(model, pairs, tok.pad_token_id, batch_size=3, padding_side=side)
    for a, b in zip(alone, batched, strict=True):
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        assert torch.equal(a.predictions, b.predictions)
    cases = [
        CASE,
        EvalRecord(index=1, prompt="Water boils at", target_new="one", target_true="one hundred degrees"),
    ]
    one_by_one = [score_cases(model, tok, [c])[0] for c in cases]
    together = score_cases(model, tok, cases, batch_size=2, padding_side=side)
    for a, b in zip(one_by_one, together, strict=True):
        assert a.loc_pred == b.loc_pred
        assert a.new_nll == pytest.approx(b.new_nll, abs=1e-5) and a.true_nll == pytest.approx(
            b.true_nll, abs=1e-5
        )


def _scores(new: float, true: float, *, para=(), neigh=(), acc=1.0, para_acc=(), loc=()) -> CaseScores:
    return CaseScores(
        new_nll=new,
        true_nll=true,
        new_acc=acc,
        para_new_nll=[p[0] for p in para],
        para_true_nll=[p[1] for p in para],
        para_new_acc=list(para_acc),
        neigh_new_nll=[n[0] for n in neigh],
        neigh_true_nll=[n[1] for n in neigh],
        loc_pred=[list(x) for x in loc],
    )


def test_aggregation_against_hand_computed_values():
    ln = math.log
    # case 1: P(o*)=0.5 > P(oc)=0.25; paraphrases: one success (0.4 vs 0.1), one failure (0.2 vs 0.3);
    #         neighbour: P(oc)=0.6 > P(o*)=0.1 (kept); locality tokens: 2 of 3 unchanged
    pre1 = _scores(ln(1 / 0.1), ln(1 / 0.5), loc=[(5, 6, 7)])
    post1 = _scores(
        ln(2),
        ln(4),
        para=[(ln(1 / 0.4), ln(10)), (ln(5), ln(1 / 0.3))],
        neigh=[(ln(10), ln(1 / 0.6))],
        acc=1.0,
        para_acc=[1.0, 0.5],
        loc=[(5, 6, 9)],
    )
    # case 2: P(o*)=0.1 < P(oc)=0.2; one paraphrase fails; neighbour flipped to o*; locality unchanged
    pre2 = _scores(ln(10), ln(5), loc=[(1, 2)])
    post2 = _scores(
        ln(10),
        ln(5),
        para=[(ln(10), ln(5))],
        neigh=[(ln(1 / 0.7), ln(1 / 0.2))],
        acc=0.5,
        para_acc=[0.0],
        loc=[(1, 2)],
    )
    m = compute_metrics(
        [pre1, pre2],
        [post1, post2],
        timings=[
            {"edit_ms": 10.0, "revert_ms": 2.0, "metrics_ms": 4.0},
            {"edit_ms": 30.0, "revert_ms": 2.0, "metrics_ms": 4.0},
        ],
        peak_mb=123.0,
    )
    assert m["cf/es"] == pytest.approx(0.5)
    assert m["cf/em"] == pytest.approx(((0.5 - 0.25) + (0.1 - 0.2)) / 2)
    assert m["cf/ps"] == pytest.approx((0.5 + 0.0) / 2)  # per case mean, then mean over cases
    assert m["cf/pm"] == pytest.approx((((0.4 - 0.1) + (0.2 - 0.3)) / 2 + (0.1 - 0.2)) / 2)
    assert m["cf/ns"] == pytest.approx(0.5)
    assert m["cf/nm"] == pytest.approx(((0.6 - 0.1) + (0.2 - 0.7)) / 2)
    assert m["cf/score"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.25 + 1 / 0.5))
    assert m["tok/reliability"] == pytest.approx(0.75)
    assert m["tok/generalization"] == pytest.approx((0.75 + 0.0) / 2)
    assert m["tok/locality"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["time/edit_ms"] == 20.0 and m["time/revert_ms"] == 2.0 and m["time/metrics_ms"] == 4.0
    assert m["time/metrics_share"] == pytest.approx(4 / 26)
    assert m["mem/peak_mb"] == 123.0 and m["data/cases"] == 2
    assert "fluency/ngram_entropy" not in m  # absent, never NaN, without generations


def test_missing_data_leaves_keys_out():
    s = CaseScores(new_nll=1.0, true_nll=None, new_acc=1.0)
    m = compute_metrics([s], [s])
    assert m["tok/reliability"] == 1.0
    assert not any(k.startswith("cf/") for k in m)
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0


def test_ngram_entropy_by_hand():
    # bigrams (a,b),(b,a),(a,b): H2 = H(2/3, 1/3); trigrams (a,b,a),(b,a,b): H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("same same same same same") == 0.0
    assert ngram_entropy("") == 0.0


def test_greedy_generation_batched_equals_single_and_feeds_fluency(tiny):
    model, tok = tiny
    prompts = ["The capital of France is", "Paris", "He was born in London and works"]
    alone = [generate_greedy(model, tok, [p], 6)[0] for p in prompts]
    assert generate_greedy(model, tok, prompts, 6, batch_size=3) == alone
    case = EvalRecord(
        index=0,
        prompt="The capital of France is",
        target_new="Rome",
        target_true="Paris",
        generation_prompts=tuple(prompts),
    )
    scores = score_cases(model, tok, [case], fluency_tokens=6)[0]
    assert scores.generations == alone
    assert scores.entropy == pytest.approx(sum(ngram_entropy(t) for t in alone) / 3)
    assert "fluency/ngram_entropy" in compute_metrics([scores], [scores])


@contextlib.contextmanager
def resident_block(mb: int):
    """`mb` MB of fresh anonymous memory, every page written (so resident), unmapped on exit: unlike a
    tensor it cannot come from memory the allocator already holds, whatever ran before in this process."""
    size = mb * 2**20
    with mmap.mmap(-1, size) as block:
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        yield


def test_peak_memory_covers_the_block():
    """The peak is reset at entry: a block that allocates 256 MB peaks ~256 MB above an empty one
    (a process-lifetime high-water mark would give both the same figure)."""
    with PeakMemory() as empty:
        pass
    with PeakMemory() as big, resident_block(256):
        pass
    if not (empty.covers_block and big.covers_block):
        pytest.skip("this kernel does not let a process reset its peak RSS (see the next test)")
    assert 200 < big.peak_mb - empty.peak_mb < 400


def test_peak_memory_without_a_reset_never_reports_an_earlier_peak(monkeypatch):
    """Where /proc/self/clear_refs cannot be written, a block under the process's earlier peak has
    no figure (None), not that earlier peak."""
    real_open = open

    def refuse_clear_refs(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse_clear_refs)
    with resident_block(256):  # raises the process's peak by 256 MB before the measured block
        pass
    with PeakMemory() as small:
        pass
    assert not small.covers_block and small.peak_mb is None


def test_forward_backward_timing_leaves_the_model_as_found(tiny):
    from factedit.core.cost import forward_backward_ms

    model, _ = tiny
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a frozen part stays frozen, a held gradient stays held
    held = torch.ones_like(params[1])
    params[1].grad = held
    before = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    ms = forward_backward_ms(model, torch.tensor([[1, 2, 3, 4]]), repeats=2)
    assert ms > 0
    assert [p.requires_grad for p in params] == flags and params[1].grad is held
    assert all(p.grad is None for i, p in enumerate(params) if i != 1)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    params[0].requires_grad_(True)
    params[1].grad = None
