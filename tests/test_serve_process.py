"""`factedit serve` as a real process: the official `openai` client talks to it, and a server killed
with SIGKILL in the middle of an edit comes back with its journal whole."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from tiny_models import CHAT_TEMPLATE, save_tiny_model

import factedit
from factedit.editing.weights import model_sha256

TOKEN = "process-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FACT = {"prompt": "The capital of France is", "target": "Rome", "method": "ft_l",
        "config": {"layers": [-1], "lr": 0.1, "norm_constraint": 0.1, "max_steps": 10}}
STARTUP_S = 120  # the shared CPU can be slow to import torch and transformers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", chat_template=CHAT_TEMPLATE)


class Server:
    """One `factedit serve` subprocess on a free loopback port."""

    def __init__(self, model: Path, journal: Path, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        self.log = open(workdir / f"server-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "FACTEDIT_CACHE": str(workdir / "cache")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "factedit.cli", "serve", "--model", str(model), "--journal", str(journal),
             "--port", str(self.port), "--token-file", str(token_file), "--threads", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready(workdir)

    def _wait_ready(self, workdir: Path) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {(workdir / f'server-{self.port}.log').read_text()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError("server did not start in time")

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=AUTH, timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers=AUTH, timeout=120, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.log.close()


def test_the_openai_client_gets_the_edited_models_answers(tiny_dir, tmp_path):
    server = Server(tiny_dir, tmp_path / "journal.sqlite", tmp_path)
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)
        name = client.models.list().data[0].id
        prompt = FACT["prompt"]

        def first_token() -> str:
            return client.completions.create(model=name, prompt=prompt, max_tokens=1, temperature=0).choices[0].text

        before = first_token()
        assert before != " Rome"
        record = server.post("/v1/edits", json=FACT)
        assert record.status_code == 201, record.text
        assert first_token() == " Rome"

        plain = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
        stream = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == plain

        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
        assert chat.choices[0].message.role == "assistant"
        assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
        streamed = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=4, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            chat.choices[0].message.content

        # A client that drops a stream frees its place in the queue.
        body = {"model": name, "prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=60) as response:
            next(response.iter_lines())
        deadline = time.monotonic() + 30
        while (generation := server.get("/v1/health").json()["generation"])["pending"]:
            assert time.monotonic() < deadline, generation
            time.sleep(0.1)
        assert generation["requests_cancelled"] >= 1

        assert httpx.delete(f"{server.url}/v1/edits/{record.json()['id']}", headers=AUTH).status_code == 200
        assert first_token() == before
        unauthorised = OpenAI(base_url=f"{server.url}/v1", api_key="wrong-token-0123456789", max_retries=0)
        with pytest.raises(Exception, match="401"):
            unauthorised.models.list()
    finally:
        server.stop()


def test_sigkill_in_the_middle_of_an_edit_keeps_the_journal_whole(tiny_dir, tmp_path):
    journal = tmp_path / "journal.sqlite"
    server = Server(tiny_dir, journal, tmp_path)
    committed = server.post("/v1/edits", json=FACT)
    assert committed.status_code == 201, committed.text
    # An edit that runs for a long time (a tiny learning rate never reaches the target), killed mid-way.
    slow = {"prompt": "The capital of Germany is", "target": "Madrid", "method": "ft",
            "config": {"layers": [-1], "lr": 1e-9, "max_steps": 1_000_000}}
    threading.Thread(target=lambda: _ignore_errors(lambda: server.post("/v1/edits", json=slow)), daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.get("/v1/health").json()["writing"]:
        assert time.monotonic() < deadline, "the slow edit did not start"
        time.sleep(0.1)
    time.sleep(0.5)  # well inside the edit's training loop
    server.stop(signal.SIGKILL)

    restarted = Server(tiny_dir, journal, tmp_path)
    try:
        history = restarted.get("/v1/edits").json()
        assert [r["id"] for r in history["data"]] == [committed.json()["id"]]
        served = restarted.get("/v1/health", params={"weights": True}).json()
        assert served["active_edits"] == 1
    finally:
        restarted.stop()
    # The served weights are the journal's active edits replayed on a fresh base model, bit for bit.
    model, tok = factedit.load_model(str(tiny_dir))
    with factedit.Editor("ft_l", tokenizer=tok, journal=journal) as editor:
        editor.attach(model)
        assert [r.id for r in editor.history] == [committed.json()["id"]]
        assert model_sha256(model) == served["weights_sha256"]
        editor.revert_all(model)
    fresh, _ = factedit.load_model(str(tiny_dir))
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name


def _ignore_errors(call) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        call()
