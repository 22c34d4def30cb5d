"""Issue 20's figures for `factedit serve` under hostile and careless clients, measured on a real server
process (default model, loopback, the server's default settings unless given):

    .venv/bin/python bench/bench_server_attacks.py                      # prints a JSON summary
    .venv/bin/python bench/bench_server_attacks.py --half-open 500 --load-s 30 --model FOLDER

1. Half-open connections: RSS when idle (/proc/<pid>/status), then `--half-open` connections, half
   of them sending half a request line and half nothing; `/v1/health` latency while they are open
   (wanted: under 1 s), RSS with them open (wanted: within 200 MiB of idle), and when the server has
   dropped them all (wanted: within its header timeout).
2. Generation next to diffs: 8 clients sending completions back to back for `--load-s` seconds while
   one writer keeps 8 diffs of an edit in flight (each with its own probe, so none is a cache hit);
   the count of 503s among the generations (wanted: 0), with every status seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from serve_process import AUTH, ServeProcess

FACT = {"prompt": "The capital of France is", "target": "Rome"}
PROMPTS = ["The capital of France is", "The Eiffel Tower is in", "The mother tongue of Danielle Darrieux is",
           "Berlin is a large city in", "The capital of Japan is", "Rome is the capital of"]


def health_latency(url: str) -> float:
    started = time.monotonic()
    response = httpx.get(f"{url}/v1/health", timeout=30)
    response.raise_for_status()
    return time.monotonic() - started


def half_open(server: ServeProcess, count: int, limit_s: float) -> dict:
    """`count` half-open connections: health latency and RSS while open, and when they were dropped."""
    for _ in range(3):  # warm: the first requests allocate what later ones reuse
        health_latency(server.url)
    idle = server.rss_mib()
    sockets = []
    opened = time.monotonic()
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        if i % 2 == 0:
            sock.sendall(b"GET /v1/health HTT")  # half a request line, then silence
        sockets.append(sock)
    latencies = [health_latency(server.url) for _ in range(5)]
    loaded = server.rss_mib()
    open_left, dropped_at = set(sockets), []
    while open_left and time.monotonic() - opened < limit_s:
        for sock in select.select(list(open_left), [], [], 0.5)[0]:
            try:
                closed = sock.recv(1024) == b""
            except ConnectionResetError:
                closed = True
            if closed:
                dropped_at.append(time.monotonic() - opened)
                open_left.discard(sock)
    for sock in sockets:
        sock.close()
    return {"connections": count, "health_latency_s": {"max": max(latencies), "median": statistics.median(latencies)},
            "rss_idle_mib": round(idle, 1), "rss_with_connections_mib": round(loaded, 1),
            "rss_growth_mib": round(loaded - idle, 1), "dropped": len(dropped_at), "still_open": len(open_left),
            "dropped_after_s": {"first": round(min(dropped_at), 2), "last": round(max(dropped_at), 2)}
            if dropped_at else None}


async def generation_and_diffs(url: str, seconds: float, tokens: int, clients: int = 8, diffs: int = 8) -> dict:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as admin:
        model = (await admin.get("/v1/models")).json()["data"][0]["id"]
        edit = await admin.post("/v1/edits", json=FACT)
        if edit.status_code != 201:
            raise SystemExit(f"the edit for the diffs failed: {edit.text}")
        edit_id = edit.json()["id"]
    generations: Counter[str] = Counter()
    diff_statuses: Counter[str] = Counter()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    probe = iter(range(10**9))

    async def generate(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as client:
            i = k
            while time.monotonic() < deadline:
                started = time.monotonic()
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0})
                generations[_label(response)] += 1
                if response.status_code == 200:
                    latencies.append(time.monotonic() - started)
                i += clients

    async def diff(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            response = await client.get(f"/v1/edits/{edit_id}/diff",
                                        params={"probe": f"Probe number {next(probe)} is about"})
            diff_statuses[_label(response)] += 1

    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600,
                                 limits=httpx.Limits(max_connections=diffs)) as writer:
        await asyncio.gather(*(generate(k) for k in range(clients)), *(diff(writer) for _ in range(diffs)))
    return {"seconds": seconds, "generation_clients": clients, "concurrent_diffs": diffs,
            "generation_503": sum(n for label, n in generations.items() if label.startswith("503")),
            "generation_statuses": dict(generations), "diff_statuses": dict(diff_statuses),
            "generation_latency_s": {"p50": round(statistics.median(latencies), 2),
                                     "max": round(max(latencies), 2)} if latencies else None}


def _label(response: httpx.Response) -> str:
    if response.status_code < 400:
        return str(response.status_code)
    try:
        return f"{response.status_code} {response.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(response.status_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' (the embedded model) or a local folder")
    parser.add_argument("--half-open", type=int, default=500, help="half-open connections")
    parser.add_argument("--load-s", type=float, default=30.0, help="seconds of generation next to diffs")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per completion")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    parser.add_argument("--header-timeout-s", type=float, default=None, help="the server's (default: its default)")
    args = parser.parse_args()

    options = []
    if args.threads:
        options += ["--threads", str(args.threads)]
    if args.header_timeout_s is not None:
        options += ["--header-timeout-s", str(args.header_timeout_s)]
    from factedit.server import ServerConfig

    header_timeout = args.header_timeout_s or ServerConfig().header_timeout_s
    work = Path(tempfile.mkdtemp(prefix="factedit-bench-attacks-"))
    server = ServeProcess(work, ["--model", args.model, "--journal", str(work / "journal.sqlite"), *options])
    try:
        connections = half_open(server, args.half_open, limit_s=header_timeout + 30)
        load = asyncio.run(generation_and_diffs(server.url, args.load_s, args.tokens))
    finally:
        server.stop()
    print(json.dumps({"model": args.model, "cpus": os.cpu_count(), "header_timeout_s": header_timeout,
                      "half_open": connections, "generation_with_diffs": load}, indent=2))


if __name__ == "__main__":
    main()
