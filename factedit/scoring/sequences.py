"""Batched scoring primitives: teacher-forced target log-probs and next-token top-k.

Sequences are right-padded with an attention mask, so positions need no shifting; every score of a
sequence is read at its own positions, which makes batched and unbatched numbers agree.
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

DEFAULT_BATCH_SIZE = 16


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


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the right (default) or the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = 0 if side == "right" else width - len(seq)
        ids[row, start : start + len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, start : start + len(seq)] = 1
    return ids, mask


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[SequenceScore]:
    """Score each (prompt_ids, target_ids) pair; target_ids may be empty (then only next_logprobs)."""
    if any(len(prompt) == 0 for prompt, _ in pairs):  # its "next token" would be read off a padding row
        raise InvalidRequestError("a prompt to score has no tokens (an empty probe or prompt): give some text")
    device = next(model.parameters()).device
    scores: list[SequenceScore] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids, mask = pad_sequences([list(p) + list(t) for p, t in chunk], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, (prompt, target) in enumerate(chunk):
            n_prompt, n_target = len(prompt), len(target)
            # The token at position i is predicted by the logits at position i - 1.
            predicting = logprobs[row, n_prompt - 1 : n_prompt - 1 + n_target]  # (n_target, V)
            target_t = torch.tensor(list(target), dtype=torch.long)
            scores.append(
                SequenceScore(
                    target_logprobs=predicting.gather(1, target_t[:, None]).squeeze(1),
                    target_argmax=predicting.argmax(-1) == target_t,
                    next_logprobs=logprobs[row, n_prompt - 1].clone(),  # not a view: frees the batch
                )
            )
    return scores


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
    pairs: list[tuple[Sequence[int], Sequence[int]]] = []
    for treq in requests:
        pairs.append((treq.prompt_ids, treq.target_ids))
        pairs.extend((ids, treq.target_ids) for ids in treq.paraphrase_ids)
        pairs.extend((ids, ()) for ids in treq.locality_ids)
    pairs.extend((encode_prompt(tokenizer, text), ()) for text in probes)
    scores = iter(score_sequences(model, pairs, pad_id_of(tokenizer)))

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
