"""Cost measures of an evaluation: wall time of a block and peak memory inside it."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

import torch

# --- memory -----------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory inside a block, in MB: torch.cuda's max allocated on a GPU device, otherwise the
    process's resident-set high-water mark (VmHWM; reset at entry where Linux allows it, so the
    figure covers the block, the model's own weights included).

        with PeakMemory(device) as mem: ...
        mem.peak_mb
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets the peak RSS (Linux >= 4.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = self.current_peak_mb()

    def current_peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        return rss / (2**20 if sys.platform == "darwin" else 1024)


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then `t["ms"]` holds the block's wall time in milliseconds."""
    box = {"ms": 0.0}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["ms"] = (time.perf_counter() - start) * 1000
