"""Context prefixes: short texts the model writes itself, put before a prompt so that an edit is fitted
over several contexts, not one (MEMIT's context templates, Meng et al. 2023).

    prefixes = ContextPrefixes(PrefixConfig()).get(model, tokenizer)   # ("", "The first ...", ...)
    text, start = in_context(prefixes[1], "The capital of France is")  # "The first .... The capital ..."

Each seed word is continued by the model for `tokens` tokens, sampled from its top-k next tokens with a
fixed seed (a generator of its own: torch's global RNG is not touched), so the prefixes of a model are
deterministic. The empty prefix (the prompt alone) comes first. They are written by the weights the
model's Editor found when it bound the model (owner.py), not by the weights its edits left: the same
prefixes before and after any edits, in the process that made them and in one that reopens its journal,
and no edited fact written into them. Those of an Editor's model are kept for each model object (weakly)
by prefix settings, tokenizer and base-weights fingerprint, so every Editor that binds the same weights
(a method switch; `factedit eval mode=single`'s Editor per record) reads them without writing them again.
Outside an Editor, a `ContextPrefixes` keeps those of each model it meets as the model is then.

`token_at(tokenizer, text, char_end)` finds the last token of a character span (a subject) in the ids
the tokenizer gives for the whole text: the key position of locate-then-edit methods.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.errors import ConfigError, InvalidRequestError
from ..core.request import encode_prompt
from ..core.settable import Integer, Settable
from .chat import chat_text, has_chat_template, user_message
from .hooks import frozen
from .owner import base_weights
from .views import viewed_model

SEPARATOR = ". "  # between a prefix and the prompt


@dataclass(frozen=True)
class PrefixConfig:
    """Which prefixes the model writes (see the module docstring)."""

    seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")  # first words, one group each
    per_seed: int = 1  # prefixes written from each seed word
    tokens: int = 8  # tokens generated after the seed word
    top_k: int = 5  # sampled among the k most likely next tokens
    seed: int = 0  # the sampler's seed: the same model gives the same prefixes

    # The seed words are not settable per edit: free text the prefixes start from.
    SETTABLE: ClassVar[Settable] = {"per_seed": Integer(0, 4), "tokens": Integer(1, 16), "top_k": Integer(1, 50),
                                    "seed": Integer(0, 2**31 - 1)}

    def __post_init__(self) -> None:
        if self.per_seed < 0 or self.tokens < 1 or self.top_k < 1:
            raise ConfigError("prefixes: per_seed must be >= 0, tokens and top_k >= 1")
        if any(not isinstance(s, str) or not s.strip() for s in self.seeds):
            raise ConfigError("prefixes: every seed must be a non-empty word")


@torch.no_grad()
def generate_prefixes(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: PrefixConfig,
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[str, ...]:
    """The empty prefix, then `per_seed` texts for each seed word (seed word + `tokens` sampled tokens),
    with braces and line breaks replaced by spaces. `params` replace some of the model's tensors
    (through functional_call; the model is not written)."""
    if config.per_seed == 0 or not config.seeds:
        return ("",)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    replaced = {name: value.to(device) for name, value in (params or {}).items()}
    out = [""]
    with frozen(model):
        for word in config.seeds:
            start = encode_prompt(tokenizer, word)
            ids = torch.tensor([start] * config.per_seed, device=device)  # (n, T): no padding needed
            step, past = ids, None  # the KV cache: each pass after the first runs the new token only
            for _ in range(config.tokens):
                kwargs = {"input_ids": step, "past_key_values": past, "use_cache": True}
                output = (torch.func.functional_call(model, replaced, args=(), kwargs=kwargs, strict=False)
                          if replaced else model(**kwargs))
                past, logits = output.past_key_values, output.logits[:, -1].float().cpu()  # (n, V)
                top = logits.topk(min(config.top_k, logits.shape[-1]))
                choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)  # (n, 1)
                step = top.indices.gather(1, choice).to(device)  # (n, 1)
                ids = torch.cat([ids, step], dim=1)
            for row in ids.tolist():
                text = tokenizer.decode(row, skip_special_tokens=True)
                out.append(" ".join(text.replace("{", " ").replace("}", " ").split()))
    return tuple(out)


class ContextPrefixes:
    """The prefixes a method's setting asks for, of each model it meets (see the module docstring)."""

    # model -> {(settings, tokenizer, base fingerprint): prefixes}: an Editor's model's, for every Editor
    _of_base: ClassVar[weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[str, ...]]]] = weakref.WeakKeyDictionary()

    def __init__(self, config: PrefixConfig) -> None:
        self.config = config
        self._by_model: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, config: PrefixConfig | None) -> ContextPrefixes | None:
        """The prefixes an editor's `prefixes` setting asks for; None (the prompt alone) for None."""
        return cls(config) if config is not None else None

    def get(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
        """The prefixes of `model`, written by its Editor's base weights; a read view (a preview's,
        views.py) shares its model's, so a session's previews do not write them again (two seconds
        each on the default model)."""
        source = viewed_model(model)
        base = base_weights(source)
        if base is None:
            if source not in self._by_model:
                self._by_model[source] = generate_prefixes(model, tokenizer, self.config)
            return self._by_model[source]
        known = self._of_base.setdefault(source, {})
        key = (self.config, type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), base.fingerprint)
        if key not in known:
            known[key] = generate_prefixes(model, tokenizer, self.config, params=base.values)
        return known[key]


def in_context(prefix: str, prompt: str) -> tuple[str, int]:
    """(text, offset): the prompt after the prefix (as-is for the empty prefix), and where it starts."""
    if not prefix:
        return prompt, 0
    text = prefix + SEPARATOR
    return text + prompt, len(text)


def in_chat(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[str, int] | None:
    """(text, offset): `prompt` as one user message through the tokenizer's chat template, up to where
    the assistant's reply begins (its ids: `ids_as_written`), and where the prompt starts in it; None when the
    tokenizer has no chat template. InvalidRequestError when the template does not keep the prompt as
    written (the subject could not be found in it)."""
    if not has_chat_template(tokenizer):
        return None
    text = chat_text(tokenizer, user_message(prompt))
    if prompt not in text:
        raise InvalidRequestError("the model's chat template does not keep the prompt as written; edit with "
                                  "chat_context off")
    return text, text.index(prompt)


def ids_as_written(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of a text that holds its own special tokens (a chat text, `in_chat`): none added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reply_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Ids of `target` as the start of an assistant's reply: no leading space, nothing added."""
    return list(tokenizer(target.strip(), add_special_tokens=False)["input_ids"])


def token_at(
    tokenizer: PreTrainedTokenizerBase, text: str, char_end: int, special_tokens: bool = True,
) -> tuple[list[int], int]:
    """(ids, index): the ids of `text` (as `encode_prompt` gives them; `special_tokens=False`: none
    added, for a text that holds its own, such as a chat template's) and the index of the token
    holding character `char_end - 1`, the last character of a span ending at `char_end`."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=special_tokens, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        hits = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < char_end]
        if hits:
            return ids, hits[-1]
    else:
        encode = encode_prompt if special_tokens else ids_as_written
        ids = encode(tokenizer, text)
        count = len(encode(tokenizer, text[:char_end]))
        if 0 < count <= len(ids):
            return ids, count - 1
    raise InvalidRequestError(f"no token of {text!r} ends the span at character {char_end}")


def subject_positions(
    tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str], prompt: str, span: tuple[int, int],
) -> list[tuple[list[int], int]]:
    """For each prefix: (ids of prefix + prompt, index of the subject's last token), `span` being the
    subject's characters in the prompt (request.subject_span)."""
    out = []
    for prefix in prefixes:
        text, offset = in_context(prefix, prompt)
        out.append(token_at(tokenizer, text, offset + span[1]))
    return out
