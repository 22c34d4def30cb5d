"""OpenAI-compatible generation: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, streamed or not.

Every prompt goes to the session's `BatchGenerator`, which generates prompts that arrive together in
one batch while holding the weights shared: an edit waits for the batch, and a batch never sees a
half-applied edit. A full queue answers 503 with Retry-After; a client past its share of the queue
(fairshare.py) 429. A streaming client that disconnects is cancelled, which frees its place in the
queue and its share at once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..model.chat import chat_text, has_chat_template
from ..session.generation_types import Completion, Finished, QueueFullError, SamplingParams, TextDelta, TokenInfo
from ..session.handle import Generation
from .access import Access, declare
from .errors import APIError
from .fairshare import Share, client_of
from .schemas import ChatRequest, CompletionRequest
from .state import ServiceState, StateDep


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["generation"])
    read = declare(Access.READ)
    router.add_api_route("/models", list_models, methods=["GET"], **read)
    router.add_api_route("/completions", create_completion, methods=["POST"], **read)
    router.add_api_route("/chat/completions", create_chat_completion, methods=["POST"], **read)
    return router


def list_models(state: StateDep) -> dict[str, Any]:
    """The one model this server serves, with its active edits."""
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.started,
                                        "owned_by": "factedit"}]}


async def create_completion(body: CompletionRequest, state: StateDep, request: Request):
    _check_model(state, body.model)
    limits = state.config.limits
    prompts = body.prompts
    if not 1 <= len(prompts) <= limits.max_prompts:
        raise APIError(422, "too_many_prompts", f"give 1 to {limits.max_prompts} prompts", param="prompt")
    token_ids = [_encode(state, prompt, body.max_tokens) for prompt in prompts]
    params = _sampling(body, body.max_tokens, body.logprobs)
    generations, share = _submit(state, request, token_ids, params)
    reply = _Reply("cmpl", "text_completion", state.model_name)
    if body.stream:
        return _stream(reply, generations, share, body.include_usage, _completion_choice)
    try:
        results = [await g.aresult() for g in generations]
    finally:  # a cancelled request (client gone) frees every prompt's slot, not only the awaited one
        _close(generations, share)
    choices = [_completion_choice(i, r.text, r.tokens, r.finish_reason, params.logprobs is not None)
               for i, r in enumerate(results)]
    return reply.body(choices, _usage(results))


async def create_chat_completion(body: ChatRequest, state: StateDep, request: Request):
    _check_model(state, body.model)
    limits = state.config.limits
    if len(body.messages) > limits.max_messages:
        raise APIError(422, "too_many_messages", f"at most {limits.max_messages} messages", param="messages")
    tokenizer = state.session.tokenizer
    if not has_chat_template(tokenizer):
        raise APIError(422, "no_chat_template", "this model's tokenizer has no chat template; use /v1/completions")
    text = chat_text(tokenizer, [{"role": m.role, "content": m.text} for m in body.messages])
    ids = _encode(state, text, body.token_budget, special_tokens=False)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(body, body.token_budget, logprobs)
    generations, share = _submit(state, request, [ids], params)
    reply = _Reply("chatcmpl", "chat.completion", state.model_name)
    if body.stream:
        return _stream(reply, generations, share, body.include_usage, _chat_delta, first=_chat_role_chunk)
    try:
        result = await generations[0].aresult()
    finally:
        _close(generations, share)
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
              "finish_reason": result.finish_reason,
              "logprobs": {"content": [_chat_logprob(t) for t in result.tokens]} if logprobs is not None else None}
    return reply.body([choice], _usage([result]))


# --- shared steps -----------------------------------------------------------------------------------
def _check_model(state: ServiceState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, "model_not_found", f"this server serves {state.model_name!r}, not {name!r}",
                       param="model")


def _encode(state: ServiceState, text: str, max_tokens: int, special_tokens: bool = True) -> list[int]:
    limits = state.config.limits
    if max_tokens > limits.max_tokens:
        raise APIError(422, "max_tokens_too_large", f"max_tokens is at most {limits.max_tokens}", param="max_tokens")
    ids = state.session.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
    if not ids:
        raise APIError(422, "empty_prompt", "the prompt is empty", param="prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(422, "prompt_too_long",
                       f"the prompt has {len(ids)} tokens; this server takes at most {limits.max_prompt_tokens}",
                       param="prompt")
    return ids


def _sampling(body, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=body.stops, logprobs=logprobs, seed=body.seed)
    except ValueError as exc:
        raise APIError(422, "invalid_request", str(exc)) from exc


def _submit(state: ServiceState, request: Request, token_ids: list[list[int]],
            params: SamplingParams) -> tuple[list[Generation], Share]:
    """Queue every prompt, or none, against the client's share (429 past it): a full queue cancels the ones
    already queued and answers 503. The caller gives the generations and the share back (`_close`)."""
    share = state.shares.take(client_of(request.scope), len(token_ids))
    generations: list[Generation] = []
    try:
        for ids in token_ids:
            generations.append(state.generator.submit(ids, params))
    except (QueueFullError, ValueError) as exc:  # ValueError: e.g. prompt + max_tokens past the context
        _close(generations, share)
        if isinstance(exc, QueueFullError):
            raise APIError(503, "overloaded", "the generation queue is full; try again shortly",
                           headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from exc
        raise APIError(422, "invalid_request", str(exc)) from exc
    return generations, share


def _close(generations: list[Generation], share: Share) -> None:
    """Cancel what is still queued or running (a no-op for finished ones) and give the share back."""
    for generation in generations:
        generation.cancel()
    share.release()


def _usage(finished: list[Finished | Completion]) -> dict[str, int]:
    prompt = sum(f.prompt_tokens for f in finished)
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Reply:
    """The id, object type and timestamp shared by one response or all chunks of one stream."""

    def __init__(self, prefix: str, kind: str, model: str) -> None:
        self.id, self.kind, self.model, self.created = f"{prefix}-{uuid.uuid4().hex}", kind, model, int(time.time())

    def body(self, choices: list[dict], usage: dict | None, kind: str | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": kind or self.kind, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


# --- completions ------------------------------------------------------------------------------------
def _completion_choice(index: int, text: str, tokens: list[TokenInfo], finish: str | None, logprobs: bool) -> dict:
    return {"index": index, "text": text, "finish_reason": finish,
            "logprobs": _completion_logprobs(tokens) if logprobs else None}


def _completion_logprobs(tokens: list[TokenInfo]) -> dict[str, list]:
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


# --- chat -------------------------------------------------------------------------------------------
def _chat_logprob(token: TokenInfo) -> dict[str, Any]:
    return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in token.top]}


def _chat_role_chunk(index: int) -> dict:
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}


def _chat_delta(index: int, text: str, tokens: list[TokenInfo], finish: str | None, logprobs: bool) -> dict:
    delta = {"content": text} if text else {}
    return {"index": index, "delta": delta, "finish_reason": finish,
            "logprobs": {"content": [_chat_logprob(t) for t in tokens]} if logprobs and tokens else None}


# --- streaming --------------------------------------------------------------------------------------
def _stream(reply: _Reply, generations: list[Generation], share: Share, include_usage: bool, choice, first=None):
    """Server-sent events: one chunk per text delta and one with the finish reason, per prompt in
    order, then the usage chunk when asked, then `[DONE]`. The generations and the share are given back
    when the response ends, however it ends."""
    chunk_kind = "chat.completion.chunk" if reply.kind == "chat.completion" else reply.kind
    logprobs = generations[0].params.logprobs is not None

    async def events() -> AsyncIterator[str]:
        finished: list[Finished] = []
        try:
            for index, generation in enumerate(generations):
                if first is not None:
                    yield _sse(reply.body([first(index)], None, chunk_kind))
                async for event in generation:
                    if isinstance(event, TextDelta):
                        chunk = choice(index, event.text, event.tokens, None, logprobs)
                    else:
                        finished.append(event)
                        chunk = choice(index, "", [], event.finish_reason, False)
                    yield _sse(reply.body([chunk], None, chunk_kind))
            if include_usage:
                yield _sse(reply.body([], _usage(finished), chunk_kind))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the stream has started: report in-band, as OpenAI does
            yield _sse({"error": {"message": str(exc), "type": "server_error", "code": "generation_failed"}})
        finally:  # also on disconnect (the task is cancelled): frees the queue slots at once
            _close(generations, share)

    return _ClosingStream(events(), lambda: _close(generations, share), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache"})


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` when its ASGI call ends, also when its body was never
    iterated (a client gone before the first chunk), which the generator's own `finally` misses."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
