"""A conversation as the model reads it: the one place factedit calls the tokenizer's chat template.

The service's `/v1/chat/completions`, the app's chat view, the said/chat checks of evaluation and the
locate family's chat row all build their texts here, so a question asked any of those ways is the
same token ids (the template's own special tokens, none added).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core.errors import ConfigError


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (base models often do not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def user_message(text: str) -> list[dict[str, str]]:
    """`text` as a conversation of one user message."""
    return [{"role": "user", "content": text}]


def chat_text(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The conversation `messages` ([{"role", "content"}]) as the model reads it, ending where the
    assistant's reply begins; ConfigError when the tokenizer has no chat template."""
    if not has_chat_template(tokenizer):
        raise ConfigError("this model's tokenizer has no chat template: use the plain continuation")
    return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """`chat_text`'s token ids (the template's own special tokens, none added)."""
    return list(tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"])
