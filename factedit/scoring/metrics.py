"""Edit metrics under two protocols, computed from batched teacher-forced forward passes.

One function, `compute_metrics`, turns per-case scores into one flat dict with `area/name` keys:

CounterFact protocol (ROME, Meng et al. 2022). For a continuation o of a prompt, NLL(o) is the mean
per-token negative log-likelihood of o's tokens and P(o) = exp(-NLL(o)). o* is the new object, oᶜ the
true one.
    cf/es   efficacy: share of cases with P(o*) > P(oᶜ) on the edit prompt
    cf/ps   generalization: the same on paraphrases (per case the mean over its paraphrases)
    cf/ps_paraphrase_prompts  the same over the paraphrases that ask the same question, where the
            dataset tells them from generation prompts (EasyEdit's flat CounterFact mixes the two in
            `rephrase_prompt`, factedit.core.rephrases); absent where it does not
    cf/ns   specificity: share of neighbourhood prompts (same relation, true answer oᶜ) with
            P(oᶜ) > P(o*) (per case the mean over its neighbourhood prompts)
    cf/em, cf/pm  mean of P(o*) - P(oᶜ) on edit prompts / paraphrases
    cf/nm   mean of P(oᶜ) - P(o*) on neighbourhood prompts
    cf/score  harmonic mean of cf/es, cf/ps, cf/ns
Token-accuracy protocol (EasyEdit, Yao et al. 2023):
    tok/reliability     teacher-forced share of o* tokens that are the argmax after the edit prompt
    tok/generalization  the same after the paraphrases
    tok/locality        share of argmax tokens over the answer tokens of the locality pairs (unrelated
                        prompts with their answers) and of the neighbourhood prompts (with oᶜ) that the
                        edit leaves unchanged: argmax before the edit == argmax after it
What the model says (opt-in here, on by default in `factedit eval`; rules and engine in said.py):
    gen/prompt          greedy success: the new target is the greedy continuation of the edit prompt
    gen/paraphrase      the same after the paraphrases (per case the mean over its paraphrases)
    gen/chat            chat success: the edit prompt asked through the chat template, judged on the
                        reply (absent when the tokenizer has no chat template)
    gen/chat_paraphrase the same for the paraphrases asked as questions
    gen/paraphrase_prompts, gen/chat_paraphrase_prompts  gen/paraphrase and gen/chat_paraphrase over the
                        paraphrases that ask the same question (as cf/ps_paraphrase_prompts): after a
                        generation prompt the target is often not the answer, so these are the rates
                        that say whether an edit reaches another wording of its question
    gen/neighbour_kept  share of neighbourhood and locality prompts whose greedy continuation the edit
                        leaves unchanged
Fluency (opt-in, slow): fluency/ngram_entropy, ROME's weighted bi-/tri-gram entropy of greedy
    generations from the case's generation prompts.
Cost: time/<name>_ms are means of the per-case timings given (edit, metrics, revert, ...);
    time/metrics_share = metrics / (edit + metrics + revert); mem/peak_mb the peak memory given
    (measured by cost.py's `PeakMemory` and `stopwatch`).

Every case is macro-averaged: per-case values first, then the mean over the cases that have the
value. A key is absent (never NaN) when no case has the data for it (e.g. cf/ns without
neighbourhood prompts).

Sequences are `prompt_ids + target_ids` with the one join rule of `request.continuation`, scored by
targets.py's batched, KV-cached engine (`score_targets`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.request import encode_prompt, encode_target
from .said import CHAT_TOKENS, SaidScores, on_paraphrase_prompts, said_case_metrics, said_scores
from .sequences import DEFAULT_BATCH_SIZE, pad_id_of, pad_sequences
from .targets import PaddingSide, TargetScore, score_targets

FLUENCY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}  # ROME's n-gram orders and weights


class FactCase(Protocol):
    """What the metrics need of one evaluation case (factedit.evaluation.EvalRecord is one)."""

    prompt: str
    target_new: str
    target_true: str | None
    paraphrases: Sequence[str]
    paraphrase_kinds: Sequence[str]  # "paraphrase" / "generation" per paraphrase; empty = all paraphrases
    neighborhood: Sequence[tuple[str, str]]  # (prompt, true answer)
    locality: Sequence[tuple[str, str]]  # (unrelated prompt, its answer)
    generation_prompts: Sequence[str]


@dataclass
class CaseScores:
    """The raw numbers of one case at one model state (JSON-ready; `to_dict`/`from_dict`).

    NLLs are mean per-token negative log-likelihoods; `*_acc` are teacher-forced shares of target
    tokens that are the argmax. `loc_pred` holds the argmax token ids over the answer tokens of each
    locality pair, then of each neighbourhood prompt with its true answer.
    """

    new_nll: float
    true_nll: float | None
    new_acc: float
    para_new_nll: list[float] = field(default_factory=list)
    para_true_nll: list[float] = field(default_factory=list)
    para_new_acc: list[float] = field(default_factory=list)
    neigh_new_nll: list[float] = field(default_factory=list)
    neigh_true_nll: list[float] = field(default_factory=list)
    loc_pred: list[list[int]] = field(default_factory=list)
    entropy: float | None = None  # fluency: mean n-gram entropy of the generations
    generations: list[str] = field(default_factory=list)
    said: SaidScores | None = None  # what the model said (generation checks), when measured
    para_kinds: list[str] = field(default_factory=list)  # the case's paraphrase_kinds (empty: all paraphrases)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseScores:
        data = dict(data)
        if data.get("said") is not None:
            data["said"] = SaidScores.from_dict(data["said"])
        return cls(**data)


def _case_pairs(tokenizer: PreTrainedTokenizerBase, case: FactCase) -> list[tuple[str, list[int], list[int]]]:
    """(kind, prompt_ids, target_ids) of every sequence one case needs, in a fixed order."""

    def pair(kind: str, prompt: str, target: str) -> tuple[str, list[int], list[int]]:
        return kind, encode_prompt(tokenizer, prompt), encode_target(tokenizer, prompt, target)

    out = [pair("new", case.prompt, case.target_new)]
    if case.target_true is not None:
        out.append(pair("true", case.prompt, case.target_true))
    for text in case.paraphrases:
        out.append(pair("para_new", text, case.target_new))
        if case.target_true is not None:
            out.append(pair("para_true", text, case.target_true))
    for text, answer in case.neighborhood:
        out.append(pair("neigh_new", text, case.target_new))
        out.append(pair("neigh_true", text, answer))
    for text, answer in case.locality:
        out.append(pair("loc", text, answer))
    return out


def _collect(pairs: list[tuple[str, list[int], list[int]]], scores: Sequence[TargetScore]) -> CaseScores:
    by_kind: dict[str, list[tuple[list[int], TargetScore]]] = {}
    for (kind, _, target), score in zip(pairs, scores, strict=True):
        by_kind.setdefault(kind, []).append((target, score))
    new_target, new = by_kind["new"][0]
    true = by_kind.get("true")
    return CaseScores(
        new_nll=new.mean_nll(),
        true_nll=true[0][1].mean_nll() if true else None,
        new_acc=new.accuracy(new_target),
        para_new_nll=[s.mean_nll() for _, s in by_kind.get("para_new", [])],
        para_true_nll=[s.mean_nll() for _, s in by_kind.get("para_true", [])],
        para_new_acc=[s.accuracy(t) for t, s in by_kind.get("para_new", [])],
        neigh_new_nll=[s.mean_nll() for _, s in by_kind.get("neigh_new", [])],
        neigh_true_nll=[s.mean_nll() for _, s in by_kind.get("neigh_true", [])],
        # locality pairs first, then the neighbourhood prompts with their true answers
        loc_pred=[s.predictions.tolist() for _, s in by_kind.get("loc", []) + by_kind.get("neigh_true", [])],
    )


def score_cases(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[FactCase],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    padding_side: PaddingSide = "right",
    fluency_tokens: int | None = None,
    generation: bool = False,
    chat_tokens: int = CHAT_TOKENS,
) -> list[CaseScores]:
    """Score every case on the model as it is now; all cases' sequences are batched together.

    fluency_tokens: when set, also generate that many tokens greedily from each generation prompt
    and record the mean n-gram entropy (slow).
    generation: also run the generation checks of said.py (greedy, chat with `chat_tokens` tokens of
    reply, neighbours' continuations), batched over all cases.
    """
    per_case = [_case_pairs(tokenizer, case) for case in cases]
    flat = [(p, t) for pairs in per_case for _, p, t in pairs]
    scores = iter(score_targets(model, flat, pad_id_of(tokenizer), batch_size, padding_side))
    results = [_collect(pairs, [next(scores) for _ in pairs]) for pairs in per_case]
    for case, result in zip(cases, results, strict=True):
        result.para_kinds = list(case.paraphrase_kinds)
    if generation:
        said = said_scores(model, tokenizer, cases, batch_size=batch_size, chat_tokens=chat_tokens)
        for result, case_said in zip(results, said, strict=True):
            result.said = case_said
    if fluency_tokens:
        for case, result in zip(cases, results, strict=True):
            prompts = list(case.generation_prompts) or [case.prompt]
            result.generations = generate_greedy(model, tokenizer, prompts, fluency_tokens, batch_size)
            result.entropy = sum(ngram_entropy(t) for t in result.generations) / len(result.generations)
    return results


# --- fluency ----------------------------------------------------------------------------------------


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """Greedy continuations (decoded, without the prompt), left-padded batches."""
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        ids, mask = pad_sequences(chunk, pad_id, "left")
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )  # (B, T + max_new_tokens)
        texts.extend(tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out)
    return texts


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str) -> float:
    """ROME's fluency measure of one text: the mean of (2/3)·H2 and (4/3)·H3, where Hn is the entropy
    (bits) of the text's word n-gram frequency distribution. Words and punctuation are split by a
    regex (ROME uses nltk.word_tokenize). A text too short for any n-gram counts as 0 for that n."""
    tokens = _WORD.findall(text)
    weighted = []
    for n, weight in FLUENCY_WEIGHTS.items():
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


# --- aggregation ------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _prob(nll: float) -> float:
    return math.exp(-nll)


def case_metrics(pre: CaseScores, post: CaseScores) -> dict[str, float]:
    """The per-case values that `compute_metrics` averages (keys absent where the case lacks data)."""
    values: dict[str, float | None] = {
        "tok/reliability": post.new_acc,
        "tok/generalization": _mean(post.para_new_acc),
        "fluency/ngram_entropy": post.entropy,
    }
    if post.true_nll is not None:
        values["cf/es"] = float(post.new_nll < post.true_nll)
        values["cf/em"] = _prob(post.new_nll) - _prob(post.true_nll)
        pairs = list(zip(post.para_new_nll, post.para_true_nll, strict=True))
        values["cf/ps"] = _mean([float(n < t) for n, t in pairs])
        values["cf/pm"] = _mean([_prob(n) - _prob(t) for n, t in pairs])
        if post.para_kinds:
            values["cf/ps_paraphrase_prompts"] = _mean(
                [float(n < t) for n, t in on_paraphrase_prompts(pairs, post.para_kinds)])
    neigh = list(zip(post.neigh_new_nll, post.neigh_true_nll, strict=True))
    values["cf/ns"] = _mean([float(t < n) for n, t in neigh])
    values["cf/nm"] = _mean([_prob(t) - _prob(n) for n, t in neigh])
    if len(pre.loc_pred) != len(post.loc_pred):
        raise ValueError("pre and post scores of a case have different locality prompts")
    values["tok/locality"] = _mean(
        [
            _mean([float(a == b) for a, b in zip(before, after, strict=True)]) or 0.0
            for before, after in zip(pre.loc_pred, post.loc_pred, strict=True)
        ]
    )
    values.update(said_case_metrics(pre.said, post.said, post.para_kinds))
    return {k: v for k, v in values.items() if v is not None}


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def compute_metrics(
    pre: Sequence[CaseScores],
    post: Sequence[CaseScores],
    timings: Sequence[Mapping[str, float]] = (),
    peak_mb: float | None = None,
) -> dict[str, float]:
    """All metrics of a set of edited cases as one flat `area/name` dict (see the module docstring).

    pre/post: each case's scores before and after the edit (aligned); for an unedited baseline pass
    the same scores twice. timings: per-case dicts of `<name>_ms` values, averaged into
    `time/<name>_ms`. peak_mb: becomes `mem/peak_mb`.
    """
    if len(pre) != len(post):
        raise ValueError(f"{len(pre)} pre scores but {len(post)} post scores")
    per_case = [case_metrics(a, b) for a, b in zip(pre, post, strict=True)]
    keys = sorted({k for values in per_case for k in values})
    metrics: dict[str, float] = {"data/cases": float(len(per_case))}
    for key in keys:
        metrics[key] = sum(v[key] for v in per_case if key in v) / sum(key in v for v in per_case)
    if all(k in metrics for k in ("cf/es", "cf/ps", "cf/ns")):
        metrics["cf/score"] = harmonic_mean([metrics["cf/es"], metrics["cf/ps"], metrics["cf/ns"]])
    for name in sorted({k for t in timings for k in t}):
        values = [t[name] for t in timings if name in t]
        metrics[f"time/{name}"] = sum(values) / len(values)
    parts = [metrics.get(f"time/{k}_ms") for k in ("edit", "metrics", "revert")]
    if parts[0] is not None and parts[1] is not None:  # the metrics' share of the per-case time
        metrics["time/metrics_share"] = parts[1] / sum(p for p in parts if p is not None)
    if peak_mb is not None:
        metrics["mem/peak_mb"] = float(peak_mb)
    return metrics
