"""A real `factedit serve` process for the tests that need one (test_serve_process.py,
test_server_attacks.py): on a free loopback port, with the test suite's tiny model and a token file."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN = "process-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STARTUP_S = 120  # the shared CPU can be slow to import torch and transformers


class Server:
    """One `factedit serve` subprocess on a free loopback port; `options`: more `serve` flags."""

    def __init__(self, model: Path, journal: Path, workdir: Path, options: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)  # the server refuses a token file others may read
        self.journal = journal
        self.log_path = workdir / f"server-{self.port}.log"
        self.log = self.log_path.open("w")
        environ = {**os.environ, "FACTEDIT_CACHE": str(workdir / "cache"), **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "factedit.cli", "serve", "--model", str(model), "--journal", str(journal),
             "--port", str(self.port), "--token-file", str(token_file), "--threads", "1", *options],
            stdout=self.log, stderr=subprocess.STDOUT, env=environ,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not start in time")

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=AUTH, timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers=AUTH, timeout=120, **kwargs)

    def connect(self) -> socket.socket:
        """A raw TCP connection to the server, for requests no HTTP client would send."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def rss_kib(self) -> int:
        """The server's resident memory (VmRSS, KiB)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def journal_sha256(self) -> str:
        """sha256 over the journal and the files beside it that share its name (origins, probes)."""
        digest = hashlib.sha256()
        for path in sorted(self.journal.parent.glob(self.journal.name + "*")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.log.close()
