"""A question to the model as a chat: the text of the conversation through the tokenizer's own chat
template, as the service's `/v1/chat/completions` builds it (server/openai_routes.py), ready for the
session's `BatchGenerator` (token ids without added special tokens: the template holds them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core.errors import ConfigError


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (base models often do not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The conversation `messages` ([{"role", "content"}]) as the model reads it, ending where the
    assistant's reply begins; ConfigError when the tokenizer has no chat template or nothing is asked."""
    if not has_chat_template(tokenizer):
        raise ConfigError("this model's tokenizer has no chat template: use the plain continuation")
    if not messages or not all((m.get("content") or "").strip() for m in messages):
        raise ConfigError("the question is empty")
    return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """`chat_text`'s token ids (the template's own special tokens, none added)."""
    return list(tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"])
