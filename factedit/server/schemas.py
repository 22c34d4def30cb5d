"""Request bodies. The OpenAI-compatible ones accept the fields OpenAI clients send and refuse, with 422,
the ones this server does not implement when they ask for something (n > 1, echo, penalties)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import MAX_LIST_ITEMS

MAX_CONFIG_FIELDS = 64  # fields in one edit's `config`: the session checks each against the method's schema


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI-compatible servers do

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        unsupported = {
            "n": self.n != 1,
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        asked = [name for name, given in unsupported.items() if given]
        if asked:
            raise ValueError(f"not supported by this server: {', '.join(asked)}")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self):
        if self.echo or (self.best_of not in (None, 1)) or self.suffix:
            raise ValueError("not supported by this server: echo, best_of, suffix")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


# Lists of an edit are bounded here at a ceiling no configured limit exceeds (config.MAX_LIST_ITEMS), so
# an absurd body fails validation (`limit_exceeded`); the configured limits are the session's to check.
_Texts = Annotated[list[str], Field(max_length=MAX_LIST_ITEMS)]


class Fact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    target: str
    subject: str | None = None
    paraphrases: _Texts = []
    locality: _Texts = []


class EditBody(BaseModel):
    """One fact (`prompt`, `target`, ...) or several (`facts`), applied as one edit."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    target: str | None = None
    subject: str | None = None
    paraphrases: _Texts = []
    locality: _Texts = []
    facts: list[Fact] | None = Field(None, max_length=MAX_LIST_ITEMS)
    method: str | None = None
    # Fields of the method's config that a caller may set (its declared schema, checked by the session),
    # taken literally: no interpolation.
    config: dict[str, Any] = Field(default_factory=dict, max_length=MAX_CONFIG_FIELDS)

    @model_validator(mode="after")
    def _one_form(self):
        single = self.prompt is not None or self.target is not None
        if single == (self.facts is not None):
            raise ValueError("give either prompt and target (one fact) or facts (a list), not both or neither")
        if single and (self.prompt is None or self.target is None):
            raise ValueError("one fact needs both prompt and target")
        return self

    def all_facts(self) -> list[Fact]:
        if self.facts is not None:
            return self.facts
        return [Fact(prompt=self.prompt, target=self.target, subject=self.subject,
                     paraphrases=self.paraphrases, locality=self.locality)]


class CompactBody(BaseModel):
    """`POST /v1/journal/compact`: which reverted edits lose their stored deltas."""

    model_config = ConfigDict(extra="forbid")

    older_than_days: float = Field(0.0, ge=0.0, le=36_500.0, allow_inf_nan=False,
                                   description="only edits reverted more than this many days ago")
