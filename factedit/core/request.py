"""Edit requests: what to change, validated and tokenized once.

The target is a continuation of the prompt. They are joined with one space unless the target already
begins with whitespace or the prompt ends with it (`continuation`). Prompt and continuation are
tokenized separately and concatenated, so the target's tokens never merge with the prompt's; every
part of factedit that scores a target uses this one rule.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError

if TYPE_CHECKING:  # annotations only: requests are made and checked without loading transformers
    from transformers import PreTrainedTokenizerBase

LOG = logging.getLogger(__name__)


def continuation(prompt: str, target: str) -> str:
    """The text that follows `prompt` for `target`: `target` with one leading space unless either
    side already has whitespace at the join."""
    if target[:1].isspace() or prompt[-1:].isspace():
        return target
    return " " + target


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: after the edit, `prompt` should continue with `target`.

    subject: the entity the fact is about (used by methods that locate it; optional).
    paraphrases: other prompts stating the same fact (generalization is measured on them).
    locality: prompts whose predictions must not change (locality is measured on them).
    """

    prompt: str
    target: str
    subject: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, what in (("prompt", "the text the new fact should follow"),
                           ("target", "the continuation the prompt should get")):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidRequestError(f"the {name} must be a string ({what}), not {type(value).__name__}")
            if not value.strip():
                raise InvalidRequestError(f"the {name} is empty: give {what}")
        if self.subject is not None and not isinstance(self.subject, str):
            raise InvalidRequestError(f"the subject must be a string or None, not {type(self.subject).__name__}")
        for name in ("paraphrases", "locality"):
            texts = getattr(self, name)
            if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
                raise InvalidRequestError(
                    f"{name} must be a list of prompts, not a {type(texts).__name__} (write [{texts!r}] for one)"
                )
            if any(not isinstance(t, str) or not t.strip() for t in texts):
                raise InvalidRequestError(f"every item of {name} must be a non-empty string")
            # Accept lists from callers but keep the request hashable and immutable.
            object.__setattr__(self, name, tuple(texts))

    @property
    def continuation(self) -> str:
        return continuation(self.prompt, self.target)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "target": self.target,
            "subject": self.subject,
            "paraphrases": list(self.paraphrases),
            "locality": list(self.locality),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRequest:
        known = {"prompt", "target", "subject", "paraphrases", "locality"}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"unknown request fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class TokenizedRequest:
    """An EditRequest with its token ids: `prompt_ids + target_ids` is the training/scoring text."""

    request: EditRequest
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    paraphrase_ids: tuple[tuple[int, ...], ...] = field(default=())
    locality_ids: tuple[tuple[int, ...], ...] = field(default=())
    anchor: int | None = None  # index in prompt_ids of the subject's last token, where an editor keys on it

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids, with the special tokens the tokenizer adds at the start of a text (if any)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_target(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> list[int]:
    """Ids of the target's continuation of `prompt`, without special tokens."""
    return list(tokenizer(continuation(prompt, target), add_special_tokens=False)["input_ids"])


def max_context(model_config: Any) -> int | None:
    """The model's context length, from its config; None when the config does not say."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize_request(
    request: EditRequest, tokenizer: PreTrainedTokenizerBase, context_length: int | None
) -> TokenizedRequest:
    """Tokenize and check that the request can be learned and scored by a model of that context."""
    prompt_ids = encode_prompt(tokenizer, request.prompt)
    target_ids = encode_target(tokenizer, request.prompt, request.target)
    _check_tokens(tokenizer, request, prompt_ids, target_ids)
    texts = [(request.prompt, prompt_ids)]
    paraphrase_ids = []
    for text in request.paraphrases:
        ids = encode_prompt(tokenizer, text)
        paraphrase_ids.append(tuple(ids))
        texts.append((text, ids))
    locality_ids = [tuple(encode_prompt(tokenizer, text)) for text in request.locality]
    scored = [(text, len(ids) + len(target_ids)) for text, ids in texts]
    scored += [(text, len(ids)) for text, ids in zip(request.locality, locality_ids, strict=True)]
    for text, length in scored:
        if context_length is not None and length > context_length:
            raise InvalidRequestError(
                f"prompt plus target is {length} tokens, longer than the model's context of "
                f"{context_length}: {text[:60]!r}..."
            )
    return TokenizedRequest(
        request, tuple(prompt_ids), tuple(target_ids), tuple(paraphrase_ids), tuple(locality_ids)
    )


def _check_tokens(
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, prompt_ids: Sequence[int], target_ids: Sequence[int]
) -> None:
    """Refuse what no edit can learn; warn about a target the tokenizer does not keep as written."""
    if not _has_words(tokenizer, prompt_ids):
        raise InvalidRequestError(
            f"the prompt {request.prompt!r} tokenizes to special tokens or whitespace only: it states no fact"
        )
    if not _has_words(tokenizer, target_ids):
        raise InvalidRequestError(
            f"the target {request.target!r} tokenizes to nothing the model can learn (only whitespace or "
            "special tokens such as end-of-text): give the words the prompt should continue with"
        )
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in target_ids:
        raise InvalidRequestError(
            f"the target {request.target!r} has characters this tokenizer cannot represent (they become "
            f"{tokenizer.unk_token!r}); the model can never write it"
        )
    decoded = tokenizer.decode(list(target_ids))
    if decoded.strip() != request.target.strip():
        LOG.warning("the target %r tokenizes to %r, which decodes to %r: the model will learn that instead",
                    request.target, list(target_ids), decoded)


def _has_words(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> bool:
    special = set(tokenizer.all_special_ids)
    return bool(tokenizer.decode([i for i in ids if i not in special]).strip())


def as_request(item: EditRequest | Mapping[str, Any]) -> EditRequest:
    """An EditRequest from a request or a mapping with its fields."""
    if isinstance(item, EditRequest):
        return item
    if isinstance(item, Mapping):
        return EditRequest.from_dict(item)
    raise InvalidRequestError(f"expected an EditRequest or a mapping, got {type(item).__name__}")


def as_requests(items: Sequence[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
    requests = [as_request(item) for item in items]
    if not requests:
        raise InvalidRequestError("no requests given")
    return requests


# --- the subject of a request: where locate-then-edit methods read and write the fact ----------------
# Words that start a sentence without naming anything ("The capital of ..."): dropped from the front of
# a capitalised run at a sentence start. Function words are skipped by the fallback rule.
_OPENERS = frozenset((
    "a", "an", "the", "in", "on", "at", "of", "for", "from", "to", "by", "with", "what", "which", "who", "whom",
    "whose", "where", "when", "why", "how", "this", "that", "these", "those", "it", "its", "he", "she", "his",
    "her", "they", "their", "we", "our", "you", "your", "i", "my", "there", "here",
))
_WORD = re.compile(r"\w+(?:['’.\-]\w+)*")


def find_subject(prompt: str) -> str:
    """The subject of `prompt` when a request names none. One deterministic rule:

    1. the last run of capitalised words (a word with an upper-case letter, as "Paris", "iPhone"; digits may
       continue a run, as in "Windows 10"; a run ends at punctuation and after a possessive "'s"),
       where a run at the start of a sentence loses a leading opener ("The", "In", "What", ...):
       "The capital of France is" -> "France", "BBC One, by" -> "BBC One";
    2. else the last word that is not a function word ("the mother tongue of paris is" -> "paris");
    3. else the last word.
    A possessive "'s" is not part of the subject. Raises InvalidRequestError for a prompt without words.
    """
    words = list(_WORD.finditer(prompt))
    if not words:
        raise InvalidRequestError(f"the prompt {prompt!r} has no words: it names no subject")
    runs: list[list[re.Match]] = []
    for index, word in enumerate(words):
        text = word.group()
        follows = _continues(prompt, words, index, runs)
        if not (any(c.isupper() for c in text) or (text[0].isdigit() and follows)):
            continue
        if follows:
            runs[-1].append(word)
        else:
            runs.append([word])
    candidates = []
    for run in runs:
        if _at_sentence_start(prompt, run[0].start()) and run[0].group().lower() in _OPENERS:
            run = run[1:]
        if run:
            candidates.append(run)
    if candidates:
        run = candidates[-1]
        return _strip_possessive(prompt[run[0].start() : run[-1].end()])
    content = [w for w in words if w.group().lower() not in _OPENERS and w.group().lower() not in _VERBS]
    return _strip_possessive((content or words)[-1].group())


_VERBS = frozenset((
    "is", "are", "was", "were", "be", "been", "has", "have", "had", "do", "does", "did", "and", "or", "but", "not",
    "as",
))


def _continues(prompt: str, words: list[re.Match], index: int, runs: list[list[re.Match]]) -> bool:
    """Whether words[index] directly follows the last word of the current run (only spaces between,
    and that word is not a possessive)."""
    if index == 0 or not runs or runs[-1][-1] is not words[index - 1]:
        return False
    previous = words[index - 1]
    return not prompt[previous.end() : words[index].start()].strip() and not _is_possessive(previous.group())


def _is_possessive(word: str) -> bool:
    return word.endswith(("'s", "’s"))


def _strip_possessive(text: str) -> str:
    return text[:-2] if _is_possessive(text) else text


def _at_sentence_start(prompt: str, start: int) -> bool:
    before = prompt[:start].rstrip()
    return not before or before[-1] in ".!?:\"“"


def with_subject(request: EditRequest) -> EditRequest:
    """`request` with its subject: the given one, else `find_subject(request.prompt)`."""
    if request.subject is not None:
        return request
    return dataclasses.replace(request, subject=find_subject(request.prompt))


def subject_span(prompt: str, subject: str) -> tuple[int, int]:
    """(start, end) characters of the last occurrence of `subject` in `prompt`; a clear error if absent."""
    if not subject.strip():
        raise InvalidRequestError("the subject is empty: give the entity the fact is about, as written in the prompt")
    start = prompt.rfind(subject)
    if start < 0:
        raise InvalidRequestError(
            f"the subject {subject!r} does not occur in the prompt {prompt!r}; give it as written in the prompt "
            "(case matters), or leave it out to let factedit find it (request.find_subject)"
        )
    return start, start + len(subject)
