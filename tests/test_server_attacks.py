"""Issue 20's attacks, played against a real `factedit serve` process on loopback with the tiny model:
each bad input gets a 4xx with a stable code (or the connection is dropped), and the served weights,
the journal's files and the health report are the same afterwards (sha256 compared).

Bounded: one server for the module, short header and body timeouts (2 s), 50 half-open connections.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from serve_helpers import AUTH, TOKEN, Server
from tiny_models import CHAT_TEMPLATE, save_tiny_model

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
SECRET_ENV = "FACTEDIT_ATTACK_SECRET"
SECRET = "attack-secret-value-8d1f"  # in the server's environment: no answer may carry it
FACT = {"prompt": "The capital of France is", "target": "Rome", "method": "ft_l",
        "config": {"layers": [-1], "lr": 0.1, "norm_constraint": 0.1, "max_steps": 10}}


@dataclass
class Served:
    server: Server
    exported: bytes  # the export of the one edit the server holds


# One worker runs this file's tests (make test: --dist loadfile), and the module fixture starts the server once.


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    model = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", chat_template=CHAT_TEMPLATE)
    workdir = tmp_path_factory.mktemp("attacks")
    options = ("--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S),
               "--keep-alive-s", "1")
    server = Server(model, workdir / "journal.sqlite", workdir, options, env={SECRET_ENV: SECRET})
    try:
        edit = server.post("/v1/edits", json=FACT)
        assert edit.status_code == 201, edit.text
        exported = server.get(f"/v1/edits/{edit.json()['id']}/export")
        assert exported.status_code == 200
        yield Served(server, exported.content)
    finally:
        server.stop()


def served_state(server: Server) -> dict:
    """What no bad input may change: the weights' and the journal's sha256 and the health report (less
    the generation counters)."""
    health = server.get("/v1/health", params={"weights": True}).json()
    health.pop("generation")
    return {"journal_sha256": server.journal_sha256(), **health}


@contextlib.contextmanager
def nothing_changes(server: Server) -> Iterator[None]:
    before = served_state(server)
    yield
    after = served_state(server)
    assert after == before
    assert after["status"] == "ok" and not after["writing"]


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# --- auth before the body ---------------------------------------------------------------------------
def test_no_token_and_a_broken_body_get_401(served):
    with nothing_changes(served.server):
        response = httpx.post(f"{served.server.url}/v1/edits", content=b"{",
                              headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and error_code(response) == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection (True) or `timeout` passes (False)."""
    data, deadline = b"", time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_head(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until a response's head is through (a blank line), or `timeout` passes: on a
    kept-alive connection, one answer without waiting for a close."""
    data, deadline = b"", time.monotonic() + timeout
    while b"\r\n\r\n" not in data and (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_60_mib_upload_without_a_token_is_refused_from_its_head(served):
    server = served.server
    head = (f"POST /v1/edits/import HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {60 << 20}\r\n\r\n").encode()
    with nothing_changes(server):
        with server.connect() as sock:
            started = time.monotonic()
            sock.sendall(head)  # and not one byte of the body
            answer, closed = read_until_closed(sock, 5)
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 401 ") and closed and elapsed < 2, (answer[:200], closed, elapsed)

        # A client that sends the body anyway: refused long before 60 MiB are through.
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            for _ in range(60):
                sent += 1
                yield b"\0" * (1 << 20)

        started = time.monotonic()
        try:
            response = httpx.post(f"{server.url}/v1/edits/import", content=body(), timeout=30,
                                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(60 << 20)})
            assert response.status_code == 401
        except httpx.TransportError:
            pass  # the server closed the connection under the body: refused as well
        assert time.monotonic() - started < 10 and sent < 60


# --- slow and silent clients --------------------------------------------------------------------------
def test_half_open_connections_are_dropped_and_health_still_answers(served):
    server = served.server
    sockets = [server.connect() for _ in range(50)]
    opened = time.monotonic()
    try:
        for sock in sockets[:25]:
            sock.sendall(b"GET /v1/health HTT")  # half a request line, then silence
        kept_alive = server.connect()  # one whole request first, then half of the next one
        kept_alive.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_head(kept_alive, 10).startswith(b"HTTP/1.1 200 ")  # answered, the connection kept
        kept_alive.sendall(b"GET /v1/hea")
        sockets.append(kept_alive)

        started = time.monotonic()
        health = httpx.get(f"{server.url}/v1/health", timeout=5)
        assert health.status_code == 200 and time.monotonic() - started < 1

        closed_after = []
        for sock in sockets:
            _, closed = read_until_closed(sock, HEADER_TIMEOUT_S + 3 - (time.monotonic() - opened))
            assert closed, "a half-open connection outlived the header timeout"
            closed_after.append(time.monotonic() - opened)
        # Dropped by the timer, not at once: the silent ones after about the timeout.
        assert min(closed_after) > HEADER_TIMEOUT_S - 0.5 and max(closed_after) < HEADER_TIMEOUT_S + 3
    finally:
        for sock in sockets:
            sock.close()


def test_a_slow_body_is_dropped_with_408(served):
    server = served.server
    head = (f"POST /v1/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
    with nothing_changes(server), server.connect() as sock:
        sock.sendall(head)
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < BODY_TIMEOUT_S + 3:  # one byte every 0.25 s: 50 s for the body
            with contextlib.suppress(OSError):
                sock.sendall(b" ")
            answer, closed = read_until_closed(sock, 0.25)
            if answer or closed:
                break
        answer += read_until_closed(sock, 2)[0]
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in answer, answer[:300]
    assert BODY_TIMEOUT_S - 0.5 < elapsed < BODY_TIMEOUT_S + 3


# --- bounded, literal configs and limits --------------------------------------------------------------
@pytest.mark.parametrize("edit", [
    {**FACT, "method": "ft", "config": {"lr": f"${{oc.env:{SECRET_ENV}}}"}},
    {**FACT, "method": "ft", "config": {"matrices": [f"${{oc.env:{SECRET_ENV}}}"]}},
    {**FACT, "method": "ft", "config": {f"${{oc.env:{SECRET_ENV}}}": 1}},
    {**FACT, "method": "ft", "config": {"preserve": {"ridge": f"${{oc.env:{SECRET_ENV}}}"}}},
], ids=["value", "list item", "key", "nested"])
def test_a_config_cannot_reach_the_servers_environment(served, edit):
    with nothing_changes(served.server):
        response = served.server.post("/v1/edits", json=edit)
    assert response.status_code == 422 and error_code(response) == "config_not_allowed", response.text
    assert SECRET not in response.text


@pytest.mark.parametrize(("edit", "code"), [
    ({**FACT, "method": "mend", "config": {"checkpoint": "/etc"}}, "config_not_allowed"),
    ({**FACT, "method": "ft", "config": {"max_steps": 1_000_000}}, "config_not_allowed"),
    ({**FACT, "method": "lora", "config": {"rank": 100_000}}, "config_not_allowed"),
    ({**FACT, "paraphrases": [f"Paraphrase {i} is" for i in range(300)]}, "limit_exceeded"),
    ({**FACT, "locality": [f"Other fact {i} is" for i in range(300)]}, "limit_exceeded"),
], ids=["mend checkpoint", "ft max_steps", "lora rank", "300 paraphrases", "300 locality"])
def test_unbounded_work_is_refused(served, edit, code):
    with nothing_changes(served.server):
        response = served.server.post("/v1/edits", json=edit)
    assert response.status_code == 422 and error_code(response) == code, response.text


def test_too_many_facts_are_refused(served):
    facts = [{"prompt": f"Fact {i} is", "target": "Rome"} for i in range(65)]
    with nothing_changes(served.server):
        response = served.server.post("/v1/edits", json={"facts": facts, "method": "ft_l", "config": FACT["config"]})
    assert response.status_code == 422 and error_code(response) == "limit_exceeded", response.text


# --- imports: all or nothing --------------------------------------------------------------------------
def with_record(data: bytes, change) -> bytes:
    """The exported file `data` with its record's metadata passed through `change` (tensors untouched)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    record = json.loads(header["__metadata__"]["record"])
    change(record)
    header["__metadata__"]["record"] = json.dumps(record)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + size:]


def _hundred_facts(record: dict) -> None:
    record["requests"] = [dict(record["requests"][0], prompt=f"Fact {i} is") for i in range(100)]


def _numeric_id(record: dict) -> None:
    record["id"] = 12345


@pytest.mark.parametrize(("change", "code"), [(_hundred_facts, "limit_exceeded"),
                                              (_numeric_id, "invalid_edit_file")], ids=["100 facts", "numeric id"])
def test_an_altered_import_is_refused_whole(served, change, code):
    upload = with_record(served.exported, change)
    with nothing_changes(served.server):
        response = served.server.post("/v1/edits/import", files={"file": ("edit.safetensors", upload)})
    assert response.status_code == 422 and error_code(response) == code, response.text


@pytest.mark.parametrize("header", [b"[]", b'"text"', b"12", b'{"__metadata__": ["x"]}', b'{"__metadata__": {"a": 1}}'])
def test_a_safetensors_header_that_is_json_but_not_an_object_is_refused(served, header):
    upload = len(header).to_bytes(8, "little") + header
    with nothing_changes(served.server):
        response = served.server.post("/v1/edits/import", files={"file": ("edit.safetensors", upload)})
    assert 400 <= response.status_code < 500 and error_code(response) == "invalid_edit_file", response.text


def test_the_unaltered_export_imports_and_once_reverted_its_delta_can_be_compacted(served):
    """The control of the import attacks (the same file, unaltered, is taken), then compaction over HTTP."""
    server = served.server
    imported = server.post("/v1/edits/import", files={"file": ("edit.safetensors", served.exported)})
    assert imported.status_code == 201, imported.text
    assert httpx.delete(f"{server.url}/v1/edits/{imported.json()['id']}", headers=AUTH).status_code == 200
    weights = server.get("/v1/health", params={"weights": True}).json()["weights_sha256"]
    before = server.get("/v1/health").json()["journal"]
    assert httpx.post(f"{server.url}/v1/journal/compact", json={}).status_code == 401
    response = server.post("/v1/journal/compact", json={"older_than_days": 0})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["dropped"] == 1 and result["bytes_after"] <= result["bytes_before"]
    after = server.get("/v1/health", params={"weights": True}).json()
    assert after["journal"]["deltas"] == before["deltas"] - 1 and after["weights_sha256"] == weights
