"""Load test of `factedit serve` on the default model: throughput from dynamic batching, latency under a
mixed load of completions and edits, bit-exact weights afterwards, and edit-to-answer.

    .venv/bin/python bench/bench_serve.py                   # 20 s per throughput phase, 60 s mixed load
    .venv/bin/python bench/bench_serve.py --load-s 20 --phase-s 10 --method ft_l

Starts `factedit serve` as a subprocess on a free loopback port with a fresh journal, then:
1. Throughput: one client, then 8 concurrent clients, each sending completions (greedy, `--tokens`
   tokens, CounterFact prompts) back to back for `--phase-s` seconds; generated tokens per second.
2. Mixed load: 8 clients for `--load-s` seconds, each request a completion with probability 0.9
   (a fifth of them streamed) and otherwise an edit (`--method`, a CounterFact fact) or, when edits
   are active, a revert. p50/p99 latency per kind; every status other than 2xx, 503 and the guard's
   refusal (422 drift_exceeded) counts as an error.
3. The server reports the sha256 of its weights, is stopped, and the journal's active edits are
   replayed on a fresh base model in this process: the hashes must agree.
4. Edit-to-answer: a new server, France -> Rome with `mend`, the next completion of "The capital of
   France is"; revert; the completion again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from records import counterfact_split
from serve_process import AUTH, ServeProcess

import factedit
from factedit.model.weights import model_sha256

FRANCE = {"prompt": "The capital of France is", "target": "Rome", "method": "mend",
          "config": {"fallback_ridges": [1.0]}}


def serve_args(journal: Path, threads: int | None) -> list[str]:
    return ["--journal", str(journal), *(["--threads", str(threads)] if threads else [])]


def facts(n: int, start: int = 0) -> list[dict]:
    records = counterfact_split("val")
    return [{"prompt": r["prompt"], "target": r["target_new"]} for r in records[start:start + n]]


async def completion(client: httpx.AsyncClient, model: str, prompt: str, tokens: int, stream: bool = False):
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": stream}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        generated = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
        return response.status_code, generated, None
    generated, status, code = 0, None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    code = chunk["error"]["code"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    generated += 1  # deltas, not exact tokens; only for the mixed load
    return status, generated, code


async def throughput(url: str, model: str, clients: int, seconds: float, tokens: int, prompts: list[str]) -> dict:
    generated, requests = 0, 0
    deadline = time.monotonic() + seconds

    async def client_loop(k: int) -> None:
        nonlocal generated, requests
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300) as client:
            i = k
            while time.monotonic() < deadline:
                status, n, _ = await completion(client, model, prompts[i % len(prompts)], tokens)
                assert status == 200, status
                generated, requests, i = generated + n, requests + 1, i + clients

    start = time.monotonic()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    elapsed = time.monotonic() - start
    return {"clients": clients, "requests": requests, "tokens": generated, "tokens_per_s": generated / elapsed}


async def mixed_load(url: str, model: str, seconds: float, method: str, prompts: list[str], pool: list[dict]):
    latencies: dict[str, list[float]] = {"completion": [], "stream": [], "edit": [], "revert": []}
    statuses: dict[str, int] = {}
    errors: list[str] = []
    active: list[str] = []
    rng = random.Random(0)
    deadline = time.monotonic() + seconds

    async def client_loop(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as client:
            while time.monotonic() < deadline:
                roll = rng.random()
                start = time.monotonic()
                code = None
                if roll < 0.9:
                    kind = "stream" if roll < 0.18 else "completion"
                    status, _, code = await completion(client, model, rng.choice(prompts), 16, kind == "stream")
                elif active and rng.random() < 0.5:
                    kind, edit_id = "revert", active.pop(rng.randrange(len(active)))
                    status = (await client.delete(f"/v1/edits/{edit_id}")).status_code
                else:
                    kind = "edit"
                    response = await client.post("/v1/edits", json={**rng.choice(pool), "method": method})
                    status = response.status_code
                    if status == 201:
                        active.append(response.json()["id"])
                    elif status != 503:
                        code = response.json()["error"]["code"]
                latencies[kind].append(time.monotonic() - start)
                label = f"{kind} {status}" + (f" {code}" if code else "")
                statuses[label] = statuses.get(label, 0) + 1
                if code == "generation_failed" or (status >= 400 and status != 503 and code != "drift_exceeded"):
                    errors.append(label)

    await asyncio.gather(*(client_loop(k) for k in range(8)))
    return latencies, statuses, errors


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per throughput phase")
    parser.add_argument("--load-s", type=float, default=60.0, help="seconds of mixed load")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion in the throughput phases")
    parser.add_argument("--method", default="mend", help="method of the edits in the mixed load")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="factedit-bench-serve-"))
    journal = work / "journal.sqlite"
    prompts = [f["prompt"] for f in facts(64, start=1000)]
    pool = facts(200, start=1200)
    server = ServeProcess(work, serve_args(journal, args.threads))
    model = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]["id"]
    try:
        one = asyncio.run(throughput(server.url, model, 1, args.phase_s, args.tokens, prompts))
        eight = asyncio.run(throughput(server.url, model, 8, args.phase_s, args.tokens, prompts))
        latencies, statuses, errors = asyncio.run(mixed_load(server.url, model, args.load_s, args.method, prompts,
                                                             pool))
        health = httpx.get(f"{server.url}/v1/health", params={"weights": True}, headers=AUTH, timeout=120).json()
    finally:
        server.stop()

    base, tok = factedit.load_model()
    with factedit.Editor("ft_l", tokenizer=tok, journal=journal) as editor:
        editor.attach(base)
        replayed = model_sha256(base)
        active = sum(r.status == "active" for r in editor.history)

    print(f"\n## factedit serve, default model, {os.cpu_count()} CPUs\n")
    print("| clients | requests | tokens | tokens/s |\n|---|---|---|---|")
    for row in (one, eight):
        print(f"| {row['clients']} | {row['requests']} | {row['tokens']} | {row['tokens_per_s']:.1f} |")
    print(f"\nthroughput 8 clients / 1 client: {eight['tokens_per_s'] / one['tokens_per_s']:.2f}x "
          f"(generator: {health['generation']['batches']} batches, mean size "
          f"{health['generation']['mean_batch_size']:.2f})\n")
    print(f"Mixed load, 8 clients, {args.load_s:.0f} s, edits with {args.method}:\n")
    print("| kind | n | p50 s | p99 s |\n|---|---|---|---|")
    for kind, values in latencies.items():
        if values:
            print(f"| {kind} | {len(values)} | {percentile(values, 50):.2f} | {percentile(values, 99):.2f} |")
    print(f"\nstatuses: {json.dumps(dict(sorted(statuses.items())))}")
    print(f"errors (not 2xx, 503 or a guard refusal): {len(errors)} {errors[:5]}")
    print(f"active edits at the end: {health['active_edits']} served, {active} in the journal; weights "
          f"{'EQUAL' if health['weights_sha256'] == replayed else 'DIFFERENT'} to the journal replayed on a "
          "fresh base model (sha256 of every parameter)")

    server = ServeProcess(work, serve_args(work / "france.sqlite", args.threads))
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
            def answer() -> str:
                body = {"model": model, "prompt": FRANCE["prompt"], "max_tokens": 4, "temperature": 0}
                return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

            before = answer()
            start = time.monotonic()
            created = client.post("/v1/edits", json=FRANCE)
            edit_s = time.monotonic() - start
            after = answer()
            reverted = client.delete(f"/v1/edits/{created.json()['id']}").status_code
            print(f"\nEdit-to-answer (mend, France -> Rome): before {before!r}; edit {created.status_code} in "
                  f"{edit_s:.1f} s; after {after!r}; revert {reverted}; then {answer()!r}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
