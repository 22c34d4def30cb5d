"""`factedit serve` as a subprocess for the benchmarks (bench_serve.py, bench_server_attacks.py): a free
loopback port, a token file only its owner may read (the server refuses any other), a log file, and
readiness by polling /v1/health."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN = "bench-token-" + "0" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class ServeProcess:
    """`factedit serve --port <free> --token-file <workdir>/token <args>`, started and ready."""

    def __init__(self, workdir: Path, args: list[str], startup_s: float = 300.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        self.log_path = workdir / f"server-{self.port}.log"
        command = [sys.executable, "-m", "factedit.cli", "serve", "--port", str(self.port), "--token-file",
                   str(token_file), *args]
        self.process = subprocess.Popen(command, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready(startup_s)

    def _wait_ready(self, startup_s: float) -> None:
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server did not start within {startup_s:.0f} s")

    def rss_mib(self) -> float:
        """The server process's resident memory (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise SystemExit("no VmRSS for the server")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
