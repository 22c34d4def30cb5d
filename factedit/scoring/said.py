"""What the model SAYS after an edit: generation-based checks, one engine and one rule for each.

Users read generated text, not probabilities. These checks complement the teacher-forced ones of
`metrics.py` and are averaged by the same `compute_metrics` (keys `gen/*`).

The rules (the same in `factedit eval`, the benchmarks and the tests):

normalise(text)
    Unicode NFKC, casefolded, every run of whitespace one space, stripped.
greedy success (`says_first`)
    `len(target ids) + GREEDY_EXTRA` tokens are generated greedily after the prompt (stopping at an
    end-of-sequence token); success when the normalised continuation STARTS WITH the normalised
    target and the target ends there at a word boundary (" Rome" passes " Rome, the", fails
    " Romeo"). The target ids are those of the one join rule (`request.encode_target`).
chat success (`says_in`)
    The question goes through the tokenizer's chat template as one user message (with the generation
    prompt); `chat_tokens` tokens of reply are generated greedily. Success when the normalised reply
    CONTAINS the normalised new target at word boundaries and, once those occurrences are taken out,
    does not contain the old (true) object at word boundaries ("Rome, not Paris" fails: the reply
    must not hedge), where an occurrence that the reply takes over from the question with a word
    beside it is no answer (the subject restated: "The City of Melbourne is in Queensland" after
    "City of Melbourne is in" → Queensland passes; "... in Queensland, not Melbourne" fails). The
    questions: the edit prompt as a sentence to complete (CHAT_SENTENCE, "Complete the sentence:
    {prompt}") and each paraphrase as a question (CHAT_QUESTION, "{paraphrase} what?"); both forms were
    chosen on CounterFact train[0:30] by how often the unedited default model's reply names the TRUE
    object (sentence 0.40 / 0.27 on prompts / paraphrases, question 0.37 / 0.33; "Fill in the blank" and
    "Finish this sentence" no better). A reply that loops is no success (`loops`: a run of one to four
    words three times in a row, or a word glued to itself three times; "London, London, London, London"
    names the target but reads as a broken model), and `gen/chat_loops` reports how many replies do.
    A tokenizer without a chat template gives None, never 0.
repeats (`says_twice`, `gen/prompt_repeats`)
    The prompt's greedy continuation (the greedy rule's `len(target ids) + GREEDY_EXTRA` tokens) holds
    the target twice at word boundaries (" Italy, Italy"): a success of the greedy rule that reads as a
    glitch. Within that short window only: " New York, New York" is past it.
neighbour kept
    The greedy continuation (`len(answer ids) + GREEDY_EXTRA` tokens) of every neighbourhood prompt
    and every unrelated (locality) prompt, before and after the edit: kept when the two normalised
    texts are equal.

Generation is batched (`generate_ids`): requests sorted by budget and prompt length, left padding,
explicit position ids (real tokens only), one prefill and then one token per step from the key/value
cache, the LM head on the last position only; a batch stops when every row has hit its budget or an
end-of-sequence token. It gives the same tokens as generating each prompt alone (tested).
"""

from __future__ import annotations

import inspect
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import compress
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.request import encode_prompt, encode_target
from ..model.chat import chat_ids, has_chat_template, user_message
from .sequences import DEFAULT_BATCH_SIZE, pad_id_of, pad_sequences

T = TypeVar("T")
GREEDY_EXTRA = 2  # tokens generated past the target's length (greedy success, neighbours)
CHAT_TOKENS = 16  # tokens of chat reply
CHAT_SENTENCE = "Complete the sentence: {prompt}"  # the edit prompt, asked in a chat
CHAT_QUESTION = "{prompt} what?"  # a paraphrase, asked in a chat


class SaidCase(Protocol):
    """What the generation checks need of one case (factedit.evaluation.EvalRecord is one)."""

    prompt: str
    target_new: str
    target_true: str | None
    paraphrases: Sequence[str]
    neighborhood: Sequence[tuple[str, str]]
    locality: Sequence[tuple[str, str]]


# --- the rules ---------------------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_GLUED = re.compile(r"([^\W\d_]{3,})\1\1")  # letters glued to themselves three times (not "1000000000")
LOOP_WORDS = 4  # the longest run of words `loops` looks for


def normalise(text: str) -> str:
    """NFKC, casefolded, whitespace runs to one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).casefold().strip()


def _at_word_boundaries(needle: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(needle) + r"(?!\w)")


def says_first(continuation: str, target: str) -> bool:
    """Greedy rule: the normalised continuation starts with the normalised target, ending at a word
    boundary."""
    want = normalise(target)
    return bool(want) and _at_word_boundaries(want).match(normalise(continuation)) is not None


def says_twice(continuation: str, target: str) -> bool:
    """Whether the normalised continuation holds the normalised target twice at word boundaries (" Italy,
    Italy": the edit pulls the model back to its target right after saying it)."""
    want = normalise(target)
    return bool(want) and len(_at_word_boundaries(want).findall(normalise(continuation))) >= 2


def loops(reply: str) -> bool:
    """Whether a reply repeats itself: a run of one to LOOP_WORDS words three times in a row ("London,
    London, London", "the official religion of the official religion of the official religion of"), or
    a word of three letters or more glued to itself three times ("bishopbishopbishop")."""
    text = normalise(reply)
    if _GLUED.search(text):
        return True
    words = _WORD.findall(text)
    return any(words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]
               for n in range(1, LOOP_WORDS + 1) for i in range(len(words) - 3 * n + 1))


def says_in(reply: str, target: str, avoid: str | None = None, question: str = "") -> bool:
    """Chat rule: the reply does not loop (`loops`) and, normalised, contains the target at word
    boundaries and, with those occurrences taken out, not `avoid` (the old object) at word boundaries,
    except where the reply restates the `question`'s words (the old object inside the subject: "The City
    of Melbourne is in Queensland" after "City of Melbourne is in" → Queensland)."""
    want, text = normalise(target), normalise(reply)
    if not want or loops(text):
        return False
    pattern = _at_word_boundaries(want)
    if pattern.search(text) is None:
        return False
    old = normalise(avoid) if avoid else ""
    if not old:
        return True
    rest, asked = pattern.sub(" ", text), _WORD.findall(normalise(question))
    return all(_restates(rest, found, asked) for found in _at_word_boundaries(old).finditer(rest))


def _restates(text: str, found: re.Match[str], asked: Sequence[str]) -> bool:
    """Whether the words `found` covers in `text`, with the word just before or just after them, are a
    run of the question's words `asked`."""
    words = _WORD.findall(found.group())
    before, after = _WORD.findall(text[: found.start()])[-1:], _WORD.findall(text[found.end() :])[:1]
    runs = [run for run in (before + words, words + after) if len(run) > len(words)]
    return any(asked[i : i + len(run)] == run for run in runs for i in range(len(asked) - len(run) + 1))


def chat_questions(prompt: str, paraphrases: Sequence[str]) -> list[str]:
    """The chat messages of one case: the edit prompt as a sentence to complete, then each
    paraphrase as a question."""
    return [CHAT_SENTENCE.format(prompt=prompt.strip())] + [
        CHAT_QUESTION.format(prompt=p.strip()) for p in paraphrases
    ]


# --- batched greedy generation -----------------------------------------------------------------------


def eos_ids_of(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """End-of-sequence ids: the model's generation config (one or several) and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _last_logit_kwargs(model: nn.Module) -> dict[str, Any]:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def _greedy_batch(
    model: nn.Module, prompts: Sequence[Sequence[int]], steps: int, pad_id: int, eos: torch.Tensor
) -> list[list[int]]:
    """`steps` greedy tokens after each prompt (rows past their end-of-sequence get pad_id)."""
    device = next(model.parameters()).device
    ids, mask = pad_sequences(prompts, pad_id, "left")
    ids, mask = ids.to(device), mask.to(device)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens only
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos = eos.to(device)
    tokens: list[torch.Tensor] = []
    past = None
    kwargs = _last_logit_kwargs(model)
    for step in range(steps):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True, **kwargs
        )
        chosen = out.logits[:, -1].argmax(-1)  # (B,)
        chosen = torch.where(done, torch.full_like(chosen, pad_id), chosen)
        tokens.append(chosen)
        done |= torch.isin(chosen, eos)
        if bool(done.all()) or step == steps - 1:
            break
        past = out.past_key_values
        ids = chosen[:, None]  # (B, 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)  # (B, T + step + 1)
    return torch.stack(tokens, dim=1).tolist()  # (B, n)


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int] | int,
    pad_id: int,
    eos_ids: frozenset[int] = frozenset(),
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[list[int]]:
    """Greedy token ids after each prompt, at most its budget, cut before the first end-of-sequence
    token; batched (sorted by budget and length, left-padded, KV cache). Results in input order."""
    budgets = [budgets] * len(prompts) if isinstance(budgets, int) else list(budgets)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    if any(not p for p in prompts) or any(b < 1 for b in budgets):
        raise ValueError("every prompt needs tokens and every budget must be >= 1")
    eos = torch.tensor(sorted(eos_ids) or [-1], dtype=torch.long)
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i])))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        steps = max(budgets[i] for i in rows)
        generated_rows = _greedy_batch(model, [prompts[i] for i in rows], steps, pad_id, eos)
        for i, generated in zip(rows, generated_rows, strict=True):
            kept = generated[: budgets[i]]
            cut = next((k for k, t in enumerate(kept) if t in eos_ids), len(kept))
            results[i] = kept[:cut]
    return results


# --- per-case scores ---------------------------------------------------------------------------------


@dataclass
class SaidScores:
    """What the model said for one case at one model state (JSON-ready), with the verdicts of the
    rules. `chat_*` are None when the tokenizer has no chat template; `chat_*` lists hold the edit
    prompt's question first, then each paraphrase's."""

    prompt_text: str
    prompt_ok: bool
    para_texts: list[str] = field(default_factory=list)
    para_ok: list[bool] = field(default_factory=list)
    neigh_texts: list[str] = field(default_factory=list)  # neighbourhood prompts, then locality prompts
    chat_replies: list[str] | None = None
    chat_ok: list[bool] | None = None
    prompt_repeats: bool = False  # the target said twice in the prompt's continuation (`says_twice`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SaidScores:
        return cls(**data)


def said_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[SaidCase],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chat_tokens: int = CHAT_TOKENS,
) -> list[SaidScores]:
    """Generate and judge every case's checks on the model as it is now; all cases' generations are
    batched together."""
    requests: list[tuple[int, str, list[int], int]] = []  # (case, kind, prompt ids, budget)
    has_chat = has_chat_template(tokenizer)
    for c, case in enumerate(cases):

        def greedy(kind: str, prompt: str, answer: str, c: int = c) -> None:
            budget = len(encode_target(tokenizer, prompt, answer)) + GREEDY_EXTRA
            requests.append((c, kind, encode_prompt(tokenizer, prompt), budget))

        greedy("prompt", case.prompt, case.target_new)
        for text in case.paraphrases:
            greedy("para", text, case.target_new)
        for text, answer in [*case.neighborhood, *case.locality]:
            greedy("neigh", text, answer)
        for question in chat_questions(case.prompt, case.paraphrases) if has_chat else ():
            requests.append((c, "chat", chat_ids(tokenizer, user_message(question)), chat_tokens))
    generated = generate_ids(
        model,
        [r[2] for r in requests],
        [r[3] for r in requests],
        pad_id_of(tokenizer),
        eos_ids_of(model, tokenizer),
        batch_size,
    )
    texts: list[dict[str, list[str]]] = [{} for _ in cases]
    for (c, kind, _, _), ids in zip(requests, generated, strict=True):
        texts[c].setdefault(kind, []).append(tokenizer.decode(ids, skip_special_tokens=True))
    results = []
    for case, mine in zip(cases, texts, strict=True):
        replies = mine.get("chat", []) if has_chat else None
        results.append(
            SaidScores(
                prompt_text=mine["prompt"][0],
                prompt_ok=says_first(mine["prompt"][0], case.target_new),
                prompt_repeats=says_twice(mine["prompt"][0], case.target_new),
                para_texts=mine.get("para", []),
                para_ok=[says_first(t, case.target_new) for t in mine.get("para", [])],
                neigh_texts=mine.get("neigh", []),
                chat_replies=replies,
                chat_ok=None if replies is None else [
                    says_in(r, case.target_new, case.target_true, q)
                    for r, q in zip(replies, chat_questions(case.prompt, case.paraphrases), strict=True)
                ],
            )
        )
    return results


# --- per-case values (averaged by metrics.compute_metrics) ------------------------------------------


def _share(values: Sequence[bool]) -> float | None:
    return sum(map(float, values)) / len(values) if values else None


def on_paraphrase_prompts(values: Sequence[T], para_kinds: Sequence[str]) -> list[T]:
    """The per-paraphrase `values` of the paraphrases whose kind is "paraphrase" (the same question),
    not a CounterFact generation prompt (factedit.core.rephrases); kinds aligned with the values."""
    if len(values) != len(para_kinds):
        raise ValueError(f"{len(values)} paraphrase values but {len(para_kinds)} paraphrase kinds")
    return list(compress(values, [kind == "paraphrase" for kind in para_kinds]))


def said_case_metrics(
    pre: SaidScores | None, post: SaidScores | None, para_kinds: Sequence[str] = (),
) -> dict[str, float]:
    """Per-case `gen/*` values (absent where the case or the tokenizer lacks the data):
    gen/prompt, gen/prompt_repeats (the target twice in the prompt's greedy continuation), gen/paraphrase
    (mean over paraphrases), gen/chat (the edit prompt's question),
    gen/chat_paraphrase (mean over the paraphrases' questions), gen/chat_loops (share of the chat
    replies that loop, every question's), gen/neighbour_kept (share of
    neighbourhood and locality prompts whose greedy continuation is unchanged). With `para_kinds`
    ("paraphrase" / "generation" per paraphrase) also gen/paraphrase_prompts and
    gen/chat_paraphrase_prompts, the two paraphrase rates over the "paraphrase" ones alone."""
    if post is None:
        return {}
    values: dict[str, float | None] = {
        "gen/prompt": float(post.prompt_ok),
        "gen/paraphrase": _share(post.para_ok),
        "gen/prompt_repeats": float(post.prompt_repeats),
    }
    if para_kinds:
        values["gen/paraphrase_prompts"] = _share(on_paraphrase_prompts(post.para_ok, para_kinds))
    if post.chat_ok is not None and post.chat_ok:
        values["gen/chat"] = float(post.chat_ok[0])
        values["gen/chat_loops"] = _share([loops(reply) for reply in post.chat_replies or []])
        values["gen/chat_paraphrase"] = _share(post.chat_ok[1:])
        if para_kinds:
            values["gen/chat_paraphrase_prompts"] = _share(on_paraphrase_prompts(post.chat_ok[1:], para_kinds))
    if pre is not None:
        if len(pre.neigh_texts) != len(post.neigh_texts):
            raise ValueError("pre and post generations of a case have different neighbour prompts")
        values["gen/neighbour_kept"] = _share(
            [normalise(a) == normalise(b) for a, b in zip(pre.neigh_texts, post.neigh_texts, strict=True)]
        )
    return {k: v for k, v in values.items() if v is not None}


def greedy_retention(now: Sequence[SaidScores | None]) -> float | None:
    """Share of the edits so far whose target is still said greedily after their prompt (the
    greedy rule) at this model state; None when no edit has generation scores."""
    scored = [s for s in now if s is not None]
    return _share([s.prompt_ok for s in scored])
