"""Cost measures of an evaluation: wall time of a block and peak memory inside it."""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Iterator

import torch

# --- memory -----------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory inside a block, in MB: torch.cuda's max allocated on a GPU device, otherwise the
    process's resident-set high-water mark (VmHWM), reset at entry so the figure covers the block
    (the model's own weights included).

        with PeakMemory(device) as mem: ...
        mem.peak_mb

    Where the kernel refuses the reset (some containers do not let a process write its own
    `clear_refs`), the high-water mark is the whole process's: it says something about the block only
    if it rose inside it. `peak_mb` is then that new mark, or None when the block stayed under an
    earlier peak, never an earlier block's figure passed off as this one's.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.covers_block = True  # False where the peak could not be reset at entry
        self._mark_at_entry = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak RSS (Linux >= 4.0) where the kernel allows it
        rss, mark = _resident_mb("VmRSS:"), self.current_peak_mb()
        # Right after a reset the mark equals the resident size (1 MB of slack for this very read).
        self.covers_block = rss is not None and mark - rss < 1.0
        self._mark_at_entry = mark
        return self

    def __exit__(self, *exc: object) -> None:
        mark = self.current_peak_mb()
        self.peak_mb = mark if self.covers_block or mark > self._mark_at_entry else None

    def current_peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        mark = _resident_mb("VmHWM:")
        if mark is not None:
            return mark
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        return rss / (2**20 if sys.platform == "darwin" else 1024)


def _resident_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (`VmRSS:`, `VmHWM:`) in MB; None where there is none."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return None


def ms_since(start: float) -> float:
    """Milliseconds since `start` (a `time.perf_counter()` reading), rounded to the microsecond."""
    return round((time.perf_counter() - start) * 1000, 3)


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then `t["ms"]` holds the block's wall time in milliseconds."""
    box = {"ms": 0.0}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["ms"] = (time.perf_counter() - start) * 1000


# --- the unit edit costs are stated in -------------------------------------------------------------


def forward_backward_ms(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time in ms of one forward and backward pass of `model` on `input_ids` (B, T) with
    the language-model loss: a gradient editor's floor, the unit edit costs are quoted in
    ("edit ÷ fwd+bwd"). One untimed warm-up pass first. The weights are untouched, and the gradients
    and `requires_grad` flags are left as they were found."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    times = []
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for _ in range(repeats + 1):
                start = time.perf_counter()
                model(input_ids=input_ids, labels=input_ids).loss.backward()
                times.append((time.perf_counter() - start) * 1000)
                for p in params:
                    p.grad = None
    finally:
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
    return statistics.median(times[1:])
