"""The HTTP service (factedit/server) through FastAPI's test client, on a tiny random Llama saved to disk:
every endpoint, every error code, auth, limits, and concurrent readers with a writer."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import wreck  # registers the test method that breaks a model
from fastapi.testclient import TestClient
from helpers import snapshot
from tiny_models import CHAT_TEMPLATE, save_tiny_model, tiny_model

import factedit
from factedit.model.specs import layer_index
from factedit.server import Limits, ServerConfig, create_app
from factedit.session import EditSession, SessionConfig
from factedit.session.generation_types import SamplingParams

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FACT = {"prompt": "The capital of France is", "target": "Rome"}
# ft_l settings that make the tiny model's top token " Rome" in a few steps.
OVERRIDES = {"ft_l": {"layers": [-1], "lr": 0.1, "norm_constraint": 0.1, "max_steps": 10},
             "ultraedit": {"layers": [1, 2, 3]}}  # its default blocks start at block 0 on 4 layers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", chat_template=CHAT_TEMPLATE)


def make_session(tiny_dir: Path, journal: Path, **config) -> EditSession:
    settings = {"model": str(tiny_dir), "journal": str(journal), "method_overrides": OVERRIDES,
                "default_method": "ft_l",
                "guard_max_ratio": 1.5, **config}
    return EditSession(SessionConfig(**settings))


@pytest.fixture
def session(tiny_dir, tmp_path):
    session = make_session(tiny_dir, tmp_path / "journal.sqlite")
    yield session
    session.close()


def test_the_session_prepares_the_guard_for_every_method_when_it_opens(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    session = make_session(tiny_dir, tmp_path / "journal.sqlite")
    try:
        guard = session.editor._safeguards.guard
        names = session._switch.edited_params(session.model)
        lowest = min(layer_index(session.model, name) for name in names)
        assert lowest >= 1  # block 0 would need no kept input: a read from it is a full pass
        assert all(g.base is not None and lowest in g.hidden for g in guard.groups)
    finally:
        session.close()
    cold = make_session(tiny_dir, tmp_path / "other.sqlite", warm_guard=False)
    try:
        assert cold.editor._safeguards.guard is None
    finally:
        cold.close()


def client_for(session: EditSession, **config) -> TestClient:
    return TestClient(create_app(session, ServerConfig(token=TOKEN, **config)))


@pytest.fixture
def client(session):
    with client_for(session) as client:
        yield client


def model_name(client: TestClient) -> str:
    return client.get("/v1/models", headers=AUTH).json()["data"][0]["id"]


def complete(client: TestClient, prompt: str, **body) -> dict:
    response = client.post("/v1/completions", headers=AUTH,
                           json={"model": model_name(client), "prompt": prompt, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def error_code(response) -> str:
    return response.json()["error"]["code"]


def greedy(session: EditSession, prompt: str, n: int) -> str:
    encoded = session.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = session.model.generate(**encoded, do_sample=False, max_new_tokens=n,
                                     pad_token_id=session.tokenizer.pad_token_id)
    return session.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


# --- generation ---------------------------------------------------------------------------------------
def test_completion_is_the_models_greedy_continuation(client, session):
    body = complete(client, "The capital of France is", max_tokens=6)
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == greedy(session, "The capital of France is", 6)
    assert choice["finish_reason"] in {"length", "stop"}
    assert body["usage"]["prompt_tokens"] == len(session.tokenizer("The capital of France is")["input_ids"])


def test_several_prompts_and_logprobs(client, session):
    prompts = ["The capital of France is", "Berlin is a large city in"]
    body = complete(client, prompts, max_tokens=3, logprobs=2)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, body["choices"], strict=True):
        assert choice["text"] == greedy(session, prompt, 3)
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
        assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
        assert all(lp <= 0 for lp in logprobs["token_logprobs"])


def test_streamed_completion_equals_the_plain_one(client):
    plain = complete(client, "The capital of Italy is", max_tokens=8)["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", headers=AUTH, json={
        "model": model_name(client), "prompt": "The capital of Italy is", "max_tokens": 8, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


def test_chat_completion_uses_the_chat_template(client, session):
    messages = [{"role": "user", "content": "The capital of France is"}]
    response = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": model_name(client), "messages": messages, "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    templated = session.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": greedy(session, templated, 5)}


def test_stop_strings_cut_the_text(client, session):
    full = greedy(session, "The capital of France is", 10)
    stop = full.strip()[:2]
    text = complete(client, "The capital of France is", max_tokens=10, stop=[stop])["choices"][0]
    assert stop not in text["text"] and text["finish_reason"] == "stop"
    assert full.startswith(text["text"])


@pytest.mark.parametrize(("body", "code"), [
    ({"max_tokens": 10_000}, "max_tokens_too_large"),
    ({"prompt": "word " * 2000}, "prompt_too_long"),
    ({"prompt": ["a"] * 40}, "too_many_prompts"),
    ({"n": 2}, "invalid_request"),
    ({"temperature": -1}, "invalid_request"),
    ({"model": "gpt-4"}, "model_not_found"),
    ({"prompt": [1, 2, 3]}, "invalid_request"),
])
def test_generation_limits_and_bad_input(client, body, code):
    request = {"model": model_name(client), "prompt": "Hello", "max_tokens": 4, **body}
    response = client.post("/v1/completions", headers=AUTH, json=request)
    assert response.status_code in (404, 422), response.text
    assert error_code(response) == code


def test_a_full_queue_answers_503_with_retry_after(session):
    with client_for(session, max_queue=1) as client:
        generator = client.app.state.factedit.generator
        name = model_name(client)
        with session.rw.write():  # as during an edit: the queued request cannot start, the queue stays full
            busy = generator.submit([5, 6, 7], SamplingParams(max_tokens=50, temperature=0))
            response = client.post("/v1/completions", headers=AUTH,
                                   json={"model": name, "prompt": "Hello", "max_tokens": 2})
            busy.cancel()
        assert response.status_code == 503
        assert error_code(response) == "overloaded" and int(response.headers["Retry-After"]) >= 1
        assert complete(client, "Hello", max_tokens=2)["choices"][0]["finish_reason"]


# --- edits --------------------------------------------------------------------------------------------
def test_edit_list_get_diff_and_revert(client, session):
    base = snapshot(session.model)
    created = client.post("/v1/edits", headers=AUTH, json={**FACT, "paraphrases": ["France's capital is"]})
    assert created.status_code == 201, created.text
    record = created.json()
    assert record["status"] == "active" and record["post"]["requests"][0]["target_prob"] > \
        record["pre"]["requests"][0]["target_prob"]
    assert complete(client, FACT["prompt"], max_tokens=1)["choices"][0]["text"] == " Rome"

    listed = client.get("/v1/edits", headers=AUTH).json()
    assert listed["total"] == 1 and listed["data"][0]["id"] == record["id"]
    assert client.get(f"/v1/edits/{record['id']}", headers=AUTH).json()["id"] == record["id"]
    diff = client.get(f"/v1/edits/{record['id']}/diff", headers=AUTH, params={"probe": ["The capital of Italy is"]})
    assert diff.status_code == 200, diff.text
    assert diff.json()["params"]

    reverted = client.delete(f"/v1/edits/{record['id']}", headers=AUTH)
    assert reverted.status_code == 200 and reverted.json()["status"] == "reverted"
    for name, p in session.model.named_parameters():
        assert torch.equal(p, base[name]), name
    again = client.delete(f"/v1/edits/{record['id']}", headers=AUTH)
    assert again.status_code == 409 and error_code(again) == "already_reverted"
    assert client.get("/v1/edits", headers=AUTH, params={"status": "active"}).json()["total"] == 0


def test_history_is_paged(client):
    ids = [client.post("/v1/edits", headers=AUTH, json={"prompt": f"Fact number {i} is", "target": "Rome"})
           .json()["id"] for i in range(3)]
    page = client.get("/v1/edits", headers=AUTH, params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 3 and [r["id"] for r in page["data"]] == ids[1:2]
    too_big = client.get("/v1/edits", headers=AUTH, params={"limit": 10_000})
    assert too_big.status_code == 422 and error_code(too_big) == "page_too_large"


def test_a_batch_of_facts_is_one_edit(client, session):
    facts = [FACT, {"prompt": "The capital of Germany is", "target": "Madrid"}]
    record = client.post("/v1/edits", headers=AUTH, json={"facts": facts, "method": "ft", "config": {
        "layers": [-1], "lr": 0.1, "max_steps": 5}}).json()
    assert record["method"] == "ft" and len(record["requests"]) == 2
    assert len(session.history()) == 1


def test_export_and_import_round_trip(client, session):
    """The imported edit gives the very weights the exported one did (torch.equal), not just its token."""
    base = snapshot(session.model)
    record = client.post("/v1/edits", headers=AUTH, json=FACT).json()
    edited = snapshot(session.model)
    exported = client.get(f"/v1/edits/{record['id']}/export", headers=AUTH)
    assert exported.status_code == 200 and exported.content[:8]
    client.delete(f"/v1/edits/{record['id']}", headers=AUTH)
    for name, p in session.model.named_parameters():
        assert torch.equal(p, base[name]), name
    imported = client.post("/v1/edits/import", headers=AUTH,
                           files={"file": ("edit.safetensors", exported.content, "application/octet-stream")})
    assert imported.status_code == 201, imported.text
    assert imported.json()["requests"] == record["requests"] and imported.json()["id"] != record["id"]
    for name, p in session.model.named_parameters():
        assert torch.equal(p, edited[name]), name
    assert complete(client, FACT["prompt"], max_tokens=1)["choices"][0]["text"] == " Rome"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"prompt": "The capital of France is"}, 422, "invalid_request"),
    ({**FACT, "facts": [FACT]}, 422, "invalid_request"),
    ({**FACT, "weights": "/etc/passwd"}, 422, "invalid_request"),
    ({"prompt": "", "target": "Rome"}, 422, "invalid_request"),
    ({**FACT, "method": "nope"}, 422, "invalid_config"),
    ({**FACT, "config": {"no_such_field": 1}}, 422, "config_not_allowed"),
    ({**FACT, "config": {"lr": "${oc.env:HOME}"}}, 422, "config_not_allowed"),
    ({**FACT, "method": "ft", "config": {"max_steps": 1_000_000}}, 422, "config_not_allowed"),
    ({"facts": [FACT] * 70}, 422, "limit_exceeded"),  # the session's limit (64)
    ({**FACT, "paraphrases": ["p"] * 17}, 422, "limit_exceeded"),  # the session's limit (16)
    ({**FACT, "paraphrases": ["p"] * 300}, 422, "limit_exceeded"),  # the schema's ceiling (256)
    ({"facts": [{**FACT, "locality": ["l"] * 300}]}, 422, "limit_exceeded"),
    ({**FACT, "config": {f"f{i}": 1 for i in range(100)}}, 422, "limit_exceeded"),
])
def test_bad_edits_are_refused_and_change_nothing(client, session, body, status, code):
    before = snapshot(session.model)
    response = client.post("/v1/edits", headers=AUTH, json=body)
    assert response.status_code == status, response.text
    assert error_code(response) == code
    assert os.environ["HOME"] not in response.text  # no interpolation reached the environment
    assert session.history() == []
    for name, p in session.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_an_edit_past_the_drift_bound_is_refused(client, session):
    before = snapshot(session.model)
    response = client.post("/v1/edits", headers=AUTH, json={**FACT, "method": wreck.WRECK, "config": {"scale": 5.0}})
    assert response.status_code == 422 and error_code(response) == "drift_exceeded", response.text
    assert session.history() == []
    for name, p in session.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_bad_uploads_are_refused(client, session):
    garbage = client.post("/v1/edits/import", headers=AUTH, files={"file": ("x.safetensors", b"not a file")})
    assert garbage.status_code == 422 and error_code(garbage) == "invalid_edit_file"
    missing = client.post("/v1/edits/import", headers=AUTH)
    assert missing.status_code == 422
    assert session.history() == []


def test_unknown_edits_are_404(client):
    for method, path in [("GET", "/v1/edits/nope"), ("DELETE", "/v1/edits/nope"), ("GET", "/v1/edits/nope/diff"),
                         ("GET", "/v1/edits/nope/export")]:
        response = client.request(method, path, headers=AUTH)
        assert response.status_code == 404 and error_code(response) == "edit_not_found", (method, path)


def test_health_reports_the_model_and_edits(client):
    client.post("/v1/edits", headers=AUTH, json=FACT)
    health = client.get("/v1/health", params={"weights": True}).json()
    assert health["status"] == "ok" and health["active_edits"] == 1
    assert health["drift"] is not None and health["drift"] < 1.5
    assert len(health["weights_sha256"]) == 64
    assert {"pending", "running", "requests_served"} <= set(health["generation"])


def test_too_many_waiting_writes_answer_503(session):
    with client_for(session, max_pending_writes=0) as client:
        response = client.post("/v1/edits", headers=AUTH, json=FACT)
    assert response.status_code == 503 and error_code(response) == "busy"
    assert "Retry-After" in response.headers


# --- security -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": TOKEN}])
def test_writes_need_the_token(client, session, headers):
    assert client.post("/v1/edits", headers=headers, json=FACT).status_code == 401
    assert client.get("/v1/edits", headers=headers).status_code == 401
    assert client.post("/v1/completions", headers=headers, json={"model": "x", "prompt": "a"}).status_code == 401
    assert session.history() == []


def test_a_missing_token_is_answered_before_the_body_is_parsed(client):
    response = client.post("/v1/edits", content=b"{", headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and error_code(response) == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer" and response.headers["Connection"] == "close"


async def call_asgi(app, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], int]:
    """One request straight into the ASGI app: (status, headers, how many times the body was asked for)."""
    asked = 0

    async def receive():
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": b"{", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": raw,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    return sent[0]["status"], {k.decode(): v.decode() for k, v in sent[0]["headers"]}, asked


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/edits"), ("POST", "/v1/edits/import"), ("DELETE", "/v1/edits/some-id"),
    ("GET", "/v1/edits/some-id/export"), ("POST", "/v1/journal/compact"), ("PUT", "/v1/anything"),
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/edits"),
    ("GET", "/v1/edits/some-id/diff"), ("GET", "/v1/models"), ("GET", "/v1/unknown"),
])
def test_no_body_byte_is_read_before_the_token(session, method, path):
    app = create_app(session, ServerConfig(token=TOKEN))
    huge = {"Content-Type": "application/octet-stream", "Content-Length": str(60 << 20)}
    status, headers, asked = asyncio.run(call_asgi(app, method, path, huge))
    assert (status, asked) == (401, 0)
    assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
    status, _, asked = asyncio.run(call_asgi(app, method, path, {**huge, "Authorization": "Bearer nope"}))
    assert (status, asked) == (401, 0)
    status, _, _ = asyncio.run(call_asgi(app, method, path, {**huge, **AUTH}))
    assert status != 401  # with the token the gate lets it through: the route's own rules follow


@pytest.mark.parametrize(("method", "path", "access"), [
    ("GET", "/v1/health", "open"), ("GET", "/openapi.json", "open"), ("GET", "/docs", "open"),
    ("GET", "/v1/edits", "read"), ("GET", "/v1/edits/x", "read"), ("GET", "/v1/edits/x/diff", "read"),
    ("GET", "/v1/models", "read"), ("POST", "/v1/completions", "read"), ("POST", "/v1/chat/completions", "read"),
    ("POST", "/v1/edits", "write"), ("POST", "/v1/edits/import", "write"), ("DELETE", "/v1/edits/x", "write"),
    ("GET", "/v1/edits/x/export", "write"), ("POST", "/v1/journal/compact", "write"),
    ("POST", "/v1/health", "write"), ("PATCH", "/v1/edits/x", "write"), ("GET", "/v1/elsewhere", "read"),
])
def test_each_route_has_the_access_it_declares(method, path, access):
    from factedit.server.access import TokenGate
    from factedit.server.app import build_routers

    routes = [route for router in build_routers() for route in router.routes]
    gate = TokenGate(None, routes=routes, open_paths=("/openapi.json", "/docs"), token=TOKEN, open_reads=False)
    assert gate.access({"type": "http", "method": method, "path": path, "root_path": ""}).value == access


def test_the_docs_are_open_and_declare_the_bearer_scheme(client):
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and client.get("/docs").status_code == 200
    document = schema.json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "the server's token (--token-file or FACTEDIT_API_TOKEN)"}
    paths = document["paths"]
    assert paths["/v1/edits"]["post"]["security"] == [{"bearer": []}]
    assert paths["/v1/edits"]["post"]["x-factedit-access"] == "write"
    assert paths["/v1/completions"]["post"]["x-factedit-access"] == "read"
    assert "security" not in paths["/v1/health"]["get"]


def test_open_reads_still_guard_writes(session):
    with client_for(session, open_reads=True) as client:
        assert client.get("/v1/edits").status_code == 200
        assert client.post("/v1/completions", json={"model": model_name(client), "prompt": "Hi",
                                                    "max_tokens": 2}).status_code == 200
        assert client.post("/v1/edits", json=FACT).status_code == 401
        assert client.get("/v1/edits/x/export").status_code == 401
        assert client.post("/v1/journal/compact", json={}).status_code == 401


def test_no_token_means_no_writes(session):
    with TestClient(create_app(session, ServerConfig(token=None))) as client:
        response = client.post("/v1/edits", json=FACT)
        health = client.get("/v1/health")
    assert response.status_code == 403 and error_code(response) == "writes_disabled"
    assert health.status_code == 200


def test_a_public_address_needs_a_token():
    with pytest.raises(factedit.ConfigError, match="loopback"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", token=TOKEN).host == "0.0.0.0"
    with pytest.raises(factedit.ConfigError, match="16 characters"):
        ServerConfig(token="short")


def test_large_bodies_get_413(session):
    with client_for(session, limits=Limits(max_body_bytes=1000, max_upload_bytes=2000)) as client:
        big = client.post("/v1/edits", headers=AUTH, json={**FACT, "paraphrases": ["x" * 2000]})
        upload = client.post("/v1/edits/import", headers=AUTH, files={"file": ("e", b"x" * 5000)})
    assert big.status_code == 413 and error_code(big) == "too_large"
    assert upload.status_code == 413
    assert session.history() == []


# --- concurrency --------------------------------------------------------------------------------------
def test_generations_run_alongside_an_edit_and_never_see_half_applied_weights(session):
    """Completions from several threads while edits and reverts run: every request succeeds and
    every answer is the greedy continuation of the weights before or after a whole edit."""
    with client_for(session) as client:
        name = model_name(client)
        prompt = FACT["prompt"]
        base_answer = greedy(session, prompt, 3)
        errors: list[str] = []
        answers: list[str] = []

        def reader():
            for _ in range(6):
                r = client.post("/v1/completions", headers=AUTH,
                                json={"model": name, "prompt": prompt, "max_tokens": 3, "temperature": 0})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    answers.append(r.json()["choices"][0]["text"])

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        record = client.post("/v1/edits", headers=AUTH, json=FACT).json()
        edited_answer = greedy(session, prompt, 3)
        client.delete(f"/v1/edits/{record['id']}", headers=AUTH)
        for t in threads:
            t.join()
        assert not errors
        assert set(answers) <= {base_answer, edited_answer}
        assert client.app.state.factedit.generator.stats.batches >= 1


def test_a_generation_that_arrives_during_an_edit_waits_for_the_whole_edit(session, monkeypatch):
    """Forced overlap: the edit holds the weights alone and, before writing them, waits until a
    completion is queued behind it; that completion then answers from the edited weights."""
    from factedit.model.weights import WeightState

    with client_for(session) as client:
        name, prompt = model_name(client), FACT["prompt"]
        generator = client.app.state.factedit.generator
        answers, overlapped = [], []

        def reader():
            r = client.post("/v1/completions", headers=AUTH,
                            json={"model": name, "prompt": prompt, "max_tokens": 3, "temperature": 0})
            answers.append(r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)

        real_apply = WeightState.apply

        def apply_with_a_reader_waiting(self, model, edit_id, delta):
            thread = threading.Thread(target=reader)
            thread.start()
            deadline = time.monotonic() + 30
            while generator.stats.pending < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            overlapped.append((session.rw.writing, generator.stats.pending))
            real_apply(self, model, edit_id, delta)
            threads.append(thread)

        threads: list[threading.Thread] = []
        monkeypatch.setattr(WeightState, "apply", apply_with_a_reader_waiting)
        assert client.post("/v1/edits", headers=AUTH, json=FACT).status_code == 201
        monkeypatch.undo()
        for thread in threads:
            thread.join()
        assert overlapped == [(True, 1)]  # the completion was queued while the edit held the weights
        assert answers == [greedy(session, prompt, 3)] and answers[0].startswith(" Rome")


# --- the remaining error codes ------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "code"), [
    ({"messages": []}, "invalid_request"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}] * 70}, "too_many_messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, "max_tokens_too_large"),
])
def test_bad_chat_requests(client, body, code):
    response = client.post("/v1/chat/completions", headers=AUTH, json={"model": model_name(client), **body})
    assert response.status_code == 422 and error_code(response) == code, response.text


def test_a_model_without_a_chat_template_refuses_chat(tmp_path):
    session = make_session(save_tiny_model(tmp_path / "plain"), tmp_path / "journal.sqlite")
    try:
        with client_for(session) as client:
            response = client.post("/v1/chat/completions", headers=AUTH, json={
                "model": model_name(client), "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        session.close()
    assert response.status_code == 422 and error_code(response) == "no_chat_template"


def test_empty_prompts_probes_and_unknown_routes(client):
    empty = client.post("/v1/completions", headers=AUTH, json={"model": model_name(client), "prompt": ""})
    assert empty.status_code == 422 and error_code(empty) == "empty_prompt"
    record = client.post("/v1/edits", headers=AUTH, json=FACT).json()
    probes = client.get(f"/v1/edits/{record['id']}/diff", headers=AUTH, params={"probe": ["p"] * 40})
    assert probes.status_code == 422 and error_code(probes) == "too_many_probes"
    unknown = client.get("/v1/nothing-here", headers=AUTH)
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"


def test_an_edit_of_another_model_is_refused_on_import(client, session, tmp_path):
    other, tok = tiny_model("llama", seed=1)
    editor = factedit.Editor("ft_l", tokenizer=tok, **OVERRIDES["ft_l"])
    record = editor.edit(other, FACT["prompt"], FACT["target"])
    exported = editor.export_edit(record.id, tmp_path / "other.safetensors").read_bytes()
    response = client.post("/v1/edits/import", headers=AUTH, files={"file": ("other.safetensors", exported)})
    assert response.status_code == 422 and error_code(response) == "model_mismatch", response.text
    assert session.history() == []


def test_an_unusable_journal_serves_read_only(tiny_dir, tmp_path):
    journal = tmp_path / "not-a-journal.sqlite"
    journal.write_text("plain text, not sqlite")
    session = make_session(tiny_dir, journal)
    try:
        with client_for(session) as client:
            assert client.get("/v1/health").json()["status"] == "read_only"
            assert complete(client, "Hello", max_tokens=2)["choices"][0]["text"] is not None
            response = client.post("/v1/edits", headers=AUTH, json=FACT)
    finally:
        session.close()
    assert response.status_code == 503 and error_code(response) == "journal_unavailable"
    assert journal.read_text() == "plain text, not sqlite"


def test_serve_token_sources(tmp_path, monkeypatch):
    from factedit.server.cli import resolve_token

    monkeypatch.delenv("FACTEDIT_API_TOKEN", raising=False)
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(factedit.ConfigError, match="loopback"):
        resolve_token(None, "0.0.0.0")
    kept = resolve_token(None, "127.0.0.1")  # created once, mode 0600, then reused
    path = tmp_path / "cache" / "serve-token"
    assert path.read_text().strip() == kept and (path.stat().st_mode & 0o777) == 0o600
    assert resolve_token(None, "127.0.0.1") == kept
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    assert resolve_token(str(token_file), "0.0.0.0") == TOKEN
    monkeypatch.setenv("FACTEDIT_API_TOKEN", "from-the-environment-123")
    assert resolve_token(None, "0.0.0.0") == "from-the-environment-123"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_token_file_others_may_open_is_refused(tmp_path, mode):
    from factedit.server.security import load_token

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(mode)
    with pytest.raises(factedit.ConfigError, match=f"chmod 600 {token_file}"):
        load_token(token_file)
    token_file.chmod(0o400)  # the owner alone, read-only: fine
    assert load_token(token_file) == TOKEN


def test_a_kept_token_open_to_others_is_made_0600_with_a_warning(tmp_path, monkeypatch, caplog):
    from factedit.server.cli import resolve_token

    monkeypatch.delenv("FACTEDIT_API_TOKEN", raising=False)
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    kept = resolve_token(None, "127.0.0.1")
    path = tmp_path / "cache" / "serve-token"
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="factedit.server.security"):
        assert resolve_token(None, "127.0.0.1") == kept
    assert (path.stat().st_mode & 0o777) == 0o600
    assert any("now 0600" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


# --- connection hygiene and shares ---------------------------------------------------------------------
def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_one_client_gets_its_share_of_the_generation_queue_and_no_more(session):
    with client_for(session, max_queue_per_client=2) as client:
        shares = client.app.state.factedit.shares
        body = {"model": model_name(client), "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        admitted: list = []
        with session.rw.write():  # as during an edit: the admitted generations stay queued
            threads = [threading.Thread(target=lambda: admitted.append(
                client.post("/v1/completions", headers=AUTH, json=body))) for _ in range(2)]
            for thread in threads:
                thread.start()
            _wait_for(lambda: shares.held("testclient") == 2)
            third = client.post("/v1/completions", headers=AUTH, json=body)
            chat = client.post("/v1/chat/completions", headers=AUTH, json={
                "model": body["model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        for thread in threads:
            thread.join()
        for refused in (third, chat):
            assert refused.status_code == 429 and error_code(refused) == "rate_limited", refused.text
            assert int(refused.headers["Retry-After"]) >= 1
        assert [r.status_code for r in admitted] == [200, 200]
        assert shares.held("testclient") == 0  # given back when the responses ended
        with client.stream("POST", "/v1/completions", headers=AUTH, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            assert list(response.iter_lines())[-2] == "data: [DONE]"
        assert shares.held("testclient") == 0
        too_many = client.post("/v1/completions", headers=AUTH, json={**body, "prompt": ["a", "b", "c"]})
        assert too_many.status_code == 429 and error_code(too_many) == "rate_limited"


def test_requests_past_the_in_flight_limit_get_503_but_health_answers(session):
    with client_for(session, max_in_flight=1) as client:
        body = {"model": model_name(client), "prompt": "Hello", "max_tokens": 2}
        held: list = []
        with session.rw.write():
            thread = threading.Thread(target=lambda: held.append(
                client.post("/v1/completions", headers=AUTH, json=body)))
            thread.start()
            _wait_for(lambda: client.app.state.factedit.generator.stats.pending >= 1)
            busy = client.get("/v1/edits", headers=AUTH)
            health = client.get("/v1/health")
        thread.join()
    assert busy.status_code == 503 and error_code(busy) == "busy" and busy.headers["Retry-After"] == "1"
    assert health.status_code == 200
    assert held[0].status_code == 200


def test_a_body_that_does_not_arrive_in_time_gets_408(session):
    app = create_app(session, ServerConfig(token=TOKEN, body_timeout_s=0.3))
    sent: list = []

    async def never():  # the client sent its head and then nothing
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/edits", "raw_path": b"/v1/edits", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", AUTH["Authorization"].encode()), (b"content-type", b"application/json"),
                         (b"content-length", b"100")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(app(scope, never, send), 10))
    assert time.monotonic() - started < 5
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 408 and headers[b"connection"] == b"close"
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_timeout"
    assert session.history() == []


def test_the_session_gets_the_servers_edit_limits(session):
    from factedit.session.limits import RequestLimits

    limits = Limits(max_facts=3, max_paraphrases=2, max_locality=1, max_text_chars=50)
    with client_for(session, limits=limits) as client:
        assert session.request_limits == RequestLimits(max_facts=3, max_paraphrases=2, max_locality=1,
                                                       max_text_chars=50)
        for body in ({"facts": [FACT] * 4}, {**FACT, "paraphrases": ["a", "b", "c"]}, {**FACT, "locality": ["a", "b"]},
                     {**FACT, "prompt": "x" * 51}):
            response = client.post("/v1/edits", headers=AUTH, json=body)
            assert response.status_code == 422 and error_code(response) == "limit_exceeded", response.text
        assert client.post("/v1/edits", headers=AUTH, json={"facts": [FACT] * 3}).status_code == 201
    with pytest.raises(factedit.ConfigError, match="max_paraphrases"):
        Limits(max_paraphrases=1000)


# --- the journal --------------------------------------------------------------------------------------
def test_compacting_the_journal_drops_reverted_deltas_and_keeps_the_records(client, session):
    kept = client.post("/v1/edits", headers=AUTH, json=FACT).json()
    gone = client.post("/v1/edits", headers=AUTH, json={"prompt": "The capital of Germany is", "target": "Madrid"})
    client.delete(f"/v1/edits/{gone.json()['id']}", headers=AUTH)
    weights = client.get("/v1/health", params={"weights": True}).json()["weights_sha256"]
    before = client.get("/v1/health").json()["journal"]
    assert before["deltas"] == 2 and before["bytes"] > 0
    too_recent = client.post("/v1/journal/compact", headers=AUTH, json={"older_than_days": 1})
    assert too_recent.status_code == 200 and too_recent.json()["dropped"] == 0, too_recent.text
    compacted = client.post("/v1/journal/compact", headers=AUTH)  # no body: older_than_days 0
    assert compacted.status_code == 200, compacted.text
    result = compacted.json()
    assert result["dropped"] == 1 and result["bytes_after"] <= result["bytes_before"]
    after = client.get("/v1/health", params={"weights": True}).json()
    assert after["journal"]["deltas"] == 1 and after["weights_sha256"] == weights
    assert [r["id"] for r in client.get("/v1/edits", headers=AUTH).json()["data"]] == [kept["id"], gone.json()["id"]]
    for bad in ({"older_than_days": -1}, {"older_than_days": "soon"}, {"keep": 1}):
        response = client.post("/v1/journal/compact", headers=AUTH, json=bad)
        assert response.status_code == 422 and error_code(response) == "invalid_request", bad
