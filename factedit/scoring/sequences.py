"""What the Editor, previews and diffs read: target log-probs, argmax flags and the next-token
distribution of (prompt, target) pairs (through targets.py's engine), top-k tokens, and logits at
chosen positions for the editors' losses.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.errors import InvalidRequestError
from ..core.request import TokenizedRequest, encode_prompt
from .padding import DEFAULT_BATCH_SIZE, pad_id_of, pad_sequences
from .targets import score_targets

__all__ = [  # pad_id_of and pad_sequences live in padding.py; many callers import them from here
    "DEFAULT_BATCH_SIZE", "SequenceScore", "logits_at", "pad_id_of", "pad_sequences", "request_pairs",
    "score_requests", "score_sequences", "summarize_requests", "top_tokens",
]

@dataclass(frozen=True)
class SequenceScore:
    """Scores of one `prompt + target` sequence."""

    target_logprobs: torch.Tensor  # (n_target,) log p(target token | prefix)
    target_argmax: torch.Tensor  # (n_target,) bool: the token is the argmax
    next_logprobs: torch.Tensor  # (vocab,) log-distribution of the token after the prompt

    @property
    def mean_logprob(self) -> float:
        return float(self.target_logprobs.mean()) if len(self.target_logprobs) else 0.0

    @property
    def joint_prob(self) -> float:
        return float(self.target_logprobs.sum().exp())


def score_sequences(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[SequenceScore]:
    """Score each (prompt_ids, target_ids) pair; target_ids may be empty (then only next_logprobs).
    The engine is targets.score_targets (one pass per distinct prompt, targets from its cache)."""
    if any(len(prompt) == 0 for prompt, _ in pairs):  # its "next token" would be read off a padding row
        raise InvalidRequestError("a prompt to score has no tokens (an empty probe or prompt): give some text")
    scores = score_targets(model, pairs, pad_id, batch_size, with_next=True)
    return [
        SequenceScore(
            target_logprobs=score.logprobs,
            target_argmax=score.predictions == torch.tensor(list(target), dtype=torch.long),
            next_logprobs=score.next_logprobs,
        )
        for score, (_, target) in zip(scores, pairs, strict=True)
    ]


def top_tokens(
    tokenizer: PreTrainedTokenizerBase, logprobs: torch.Tensor, k: int = 5
) -> list[dict[str, Any]]:
    """The k most likely next tokens as [{"token", "id", "prob"}]."""
    values, ids = logprobs.topk(k)
    return [
        {"token": tokenizer.decode([int(i)]), "id": int(i), "prob": round(float(v.exp()), 6)}
        for v, i in zip(values, ids, strict=True)
    ]


def score_requests(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[TokenizedRequest],
    probes: Sequence[str] = (),
    top_k: int = 5,
    old_answers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """What the Editor records before and after an edit, in one batched pass.

    Per request: the target's joint probability and whether each target token is the argmax, on the
    prompt and on each paraphrase; top-k next tokens on the prompt; top-k on each locality prompt.
    `probes` are extra prompts scored like locality prompts (for diffs and the app).
    `old_answers`: per request, the token id whose probability to report as `old_answer_prob`
    (after an edit: the top-1 before it); by default the current top-1.
    """
    scores = score_sequences(model, request_pairs(tokenizer, requests, probes), pad_id_of(tokenizer))
    return summarize_requests(tokenizer, requests, scores, probes, top_k, old_answers)


def request_pairs(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest], probes: Sequence[str] = (),
) -> list[tuple[Sequence[int], Sequence[int]]]:
    """The (prompt ids, target ids) pairs `score_requests` scores, in its order: per request the prompt,
    its paraphrases (with the target) and its locality prompts (no target); then `probes`."""
    pairs: list[tuple[Sequence[int], Sequence[int]]] = []
    for treq in requests:
        pairs.append((treq.prompt_ids, treq.target_ids))
        pairs.extend((ids, treq.target_ids) for ids in treq.paraphrase_ids)
        pairs.extend((ids, ()) for ids in treq.locality_ids)
    pairs.extend((encode_prompt(tokenizer, text), ()) for text in probes)
    return pairs


def summarize_requests(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[TokenizedRequest],
    scores: Sequence[SequenceScore],
    probes: Sequence[str] = (),
    top_k: int = 5,
    old_answers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """`score_requests`'s result from `scores` of its `request_pairs` (so a caller that scored them
    already, a preview, records exactly what `score_requests` would)."""
    scores = iter(scores)

    def target_view(score: SequenceScore) -> dict[str, Any]:
        return {"target_prob": score.joint_prob, "target_is_argmax": bool(score.target_argmax.all())}

    results = []
    for index, treq in enumerate(requests):
        main = next(scores)
        old_id = int(main.next_logprobs.argmax()) if old_answers is None else int(old_answers[index])
        results.append(
            {
                **target_view(main),
                "old_answer": {"id": old_id, "token": tokenizer.decode([old_id]),
                               "prob": float(main.next_logprobs[old_id].exp())},
                "top": top_tokens(tokenizer, main.next_logprobs, top_k),
                "paraphrases": [target_view(next(scores)) for _ in treq.paraphrase_ids],
                "locality": [
                    {"prompt": text, "top": top_tokens(tokenizer, next(scores).next_logprobs, top_k)}
                    for text in treq.request.locality
                ],
            }
        )
    probe_results = [
        {"prompt": text, "top": top_tokens(tokenizer, next(scores).next_logprobs, top_k)} for text in probes
    ]
    return {"requests": results, "probes": probe_results}


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    select: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits (M, V) at the positions set in `select` (B, T), row-major, with the language-model head
    run on those M positions only (`logits_to_keep` where the model takes it trims the positions to
    their union over rows; a pre-hook on the head keeps each row's own). `params` (optional) go to
    `torch.func.functional_call`; the model's tensors are never written. Gradients flow as usual."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    keep = select.any(0).nonzero().squeeze(1)  # (K,)
    rows = select
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
        rows = select[:, keep]  # (B, K)

    def gather(module: nn.Module, args: tuple) -> tuple:
        return (args[0][rows].unsqueeze(0), *args[1:])  # (1, M, d)

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        if params is not None:
            out = torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False)
        else:
            out = model(**kwargs)
    finally:
        handle.remove()
    return out.logits.squeeze(0)  # (M, V)
