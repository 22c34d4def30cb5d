"""Training and validation data for MEND: CounterFact and zsRE records as tokenized edit examples.

Each example is an edit (prompt -> new target), its paraphrase (-> the same target), and a locality
prompt with its answer, whose predictions the edit must keep. For CounterFact the locality prompt is
a neighbourhood prompt (same relation, same true object as the edited fact); for zsRE it is an
unrelated Natural Questions pair. The true object is kept for the CounterFact metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..core.errors import InvalidRequestError
from ..core.rephrases import rephrase_kind
from ..core.request import EditRequest, TokenizedRequest, encode_prompt, encode_target, tokenize_request

LOG = logging.getLogger(__name__)
Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt_ids, target_ids)


@dataclass(frozen=True)
class EditExample:
    """One training/validation record, tokenized with the project's one join rule."""

    edit: TokenizedRequest  # prompt -> new target
    rephrase: TokenizedRequest  # paraphrase -> new target
    loc: TokenizedRequest  # locality prompt -> its own (true) answer
    loc_new: TokenizedRequest  # locality prompt -> the edit's new target (what must not rise there)
    true_target: str | None = None  # the object before the edit (CounterFact metrics)
    source: str = ""
    same_question: bool = True  # the rephrase asks the edit's question (False: a CounterFact generation prompt)


def _request(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> TokenizedRequest:
    return tokenize_request(EditRequest(prompt, target), tokenizer, None)


def counterfact_example(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> EditExample:
    return EditExample(
        edit=_request(tokenizer, record["prompt"], record["target_new"]),
        rephrase=_request(tokenizer, record["rephrase_prompt"], record["target_new"]),
        loc=_request(tokenizer, record["locality_prompt"], record["locality_ground_truth"]),
        loc_new=_request(tokenizer, record["locality_prompt"], record["target_new"]),
        true_target=record["ground_truth"],
        source=f"counterfact:{record.get('case_id', '')}",
        same_question=rephrase_kind(record["rephrase_prompt"], record.get("subject")) == "paraphrase",
    )


def zsre_example(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> EditExample:
    answers = record.get("answers") or [None]
    return EditExample(
        edit=_request(tokenizer, record["src"], record["alt"]),
        rephrase=_request(tokenizer, record["rephrase"], record["alt"]),
        loc=_request(tokenizer, record["loc"], record["loc_ans"]),
        loc_new=_request(tokenizer, record["loc"], record["alt"]),
        true_target=answers[0],
        source="zsre",
    )


def load_examples(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, kind: str, start: int = 0, limit: int | None = None
) -> list[EditExample]:
    """Records [start, start + limit) of a CounterFact ("counterfact") or zsRE ("zsre") JSON file."""
    records = json.loads(Path(path).read_text())
    end = None if limit is None else start + limit
    make = counterfact_example if kind == "counterfact" else zsre_example
    out, skipped = [], 0
    for record in records[start:end]:
        try:
            out.append(make(record, tokenizer))
        except InvalidRequestError:  # an empty text field: nothing to learn from
            skipped += 1
    if skipped:
        LOG.info("%s: skipped %d record(s) with an empty prompt or target", path, skipped)
    return out


def cf_pairs(example: EditExample, tokenizer: PreTrainedTokenizerBase) -> list[Pair]:
    """The six sequences of the CounterFact metrics, in this order: (edit prompt, rephrase, locality
    prompt) × (new target, true target); on the locality prompt the "true" one is its own answer."""
    new, true = example.edit.request.target, example.true_target or ""
    loc_true = example.loc.request.target
    out = []
    for prompt, first, second in (
        (example.edit.request.prompt, new, true),
        (example.rephrase.request.prompt, new, true),
        (example.loc.request.prompt, new, loc_true),
    ):
        ids = tuple(encode_prompt(tokenizer, prompt))
        out.append((ids, tuple(encode_target(tokenizer, prompt, first))))
        out.append((ids, tuple(encode_target(tokenizer, prompt, second))))
    return out


def counterfact_flags(mean_logprobs: Sequence[float]) -> dict[str, float]:
    """ES/PS/NS indicators of one example from the six mean log-probs of `cf_pairs`."""
    e_new, e_true, r_new, r_true, l_new, l_true = mean_logprobs
    return {"es": float(e_new > e_true), "ps": float(r_new > r_true), "ns": float(l_true > l_new)}
