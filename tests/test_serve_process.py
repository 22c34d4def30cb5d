"""`factedit serve` as a real process: the official `openai` client talks to it, and a server killed
with SIGKILL in the middle of an edit comes back with its journal whole."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from serve_helpers import AUTH, TOKEN, Server
from tiny_models import CHAT_TEMPLATE, save_tiny_model

import factedit
from factedit.model.weights import model_sha256

FACT = {"prompt": "The capital of France is", "target": "Rome", "method": "ft_l",
        "config": {"layers": [-1], "lr": 0.1, "norm_constraint": 0.1, "max_steps": 10}}
# An edit that runs for seconds within the bounds a caller may set: the most facts and paraphrases, the
# most steps, a learning rate too small to ever reach the target (no early stop).
SLOW_EDIT = {"method": "ft", "config": {"layers": [-1], "lr": 1e-6, "max_steps": 200}, "facts": [
    {"prompt": f"The capital of country number {i} is", "target": "Madrid",
     "paraphrases": [f"Paraphrase {j} of fact {i}: the capital is" for j in range(16)]} for i in range(64)]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", chat_template=CHAT_TEMPLATE)


def test_the_openai_client_gets_the_edited_models_answers(tiny_dir, tmp_path):
    # One generation per client: a share not given back (a dropped stream's) would make the next one 429.
    server = Server(tiny_dir, tmp_path / "journal.sqlite", tmp_path, options=("--max-queue-per-client", "1"))
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

        # A client that drops a stream frees its place in the queue and its share.
        body = {"model": name, "prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=60) as response:
            next(response.iter_lines())
        deadline = time.monotonic() + 30
        while (generation := server.get("/v1/health").json()["generation"])["pending"]:
            assert time.monotonic() < deadline, generation
            time.sleep(0.1)
        assert generation["requests_cancelled"] >= 1
        assert first_token() == " Rome"

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
    # An edit that runs for seconds, killed mid-way.
    threading.Thread(target=lambda: _ignore_errors(lambda: server.post("/v1/edits", json=SLOW_EDIT)),
                     daemon=True).start()
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
