"""A progress bar that moves for every method: step i/N and the loss where the method reports its steps
(the fine-tuning family), the seconds so far for every method, ticking from a helper thread while the
computation holds the script's thread (a one-pass method such as mend reports no steps)."""

from __future__ import annotations

import math
import threading
import time
from types import TracebackType

from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

TICK_S = 0.5  # how often the seconds are redrawn
EXPECTED_S = 10.0  # time scale of the bar's creep when no step count is known (never reaches the end)


class Ticker:
    """`with Ticker(slot, "Previewing with lora") as ticker: work(progress=ticker.report)`; `start`/`share`
    place this bar's steps within a longer action (several methods one after another)."""

    def __init__(self, slot, label: str, start: float = 0.0, share: float = 1.0) -> None:
        self.slot, self.label, self.start, self.share = slot, label, start, share
        self._step: tuple[int, int, float] | None = None
        self._began = time.perf_counter()
        self._lock = threading.Lock()  # the script's thread (report) and the ticking thread draw in turn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._draw()

    def report(self, step: int, total: int, loss: float) -> None:
        """The method's progress callback: progress(step, max_steps, loss)."""
        with self._lock:
            self._step = (step, total, loss)
            self._draw()

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self._began
        if self._step is not None:
            step, total, loss = self._step
            done = step / max(total, 1)
            text = f"{self.label}: step {step}/{total}, loss {loss:.3f} · {elapsed:.0f} s"
        else:
            done = 0.9 * (1 - math.exp(-elapsed / EXPECTED_S))
            text = f"{self.label}… {elapsed:.0f} s"
        self.slot.progress(min(self.start + self.share * done, 1.0), text=text)

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                try:
                    self._draw()
                except ScriptControlException:  # the run is being stopped or rerun: the script thread ends it
                    return

    def __enter__(self) -> Ticker:
        ctx = get_script_run_ctx(suppress_warning=True)
        if ctx is not None:  # without a script run (a bare call), the bar only moves on reported steps
            self._thread = threading.Thread(target=self._tick, name="factedit-app-ticker", daemon=True)
            add_script_run_ctx(self._thread, ctx)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
