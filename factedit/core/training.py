"""What every training editor shares with the Editor: the progress callback's type and a seeded block.

`progress(step, max_steps, loss)` is how an editor that trains reports while it computes (the app's
progress bars); `seeded(seed)` fixes torch's RNG for an editor's initialisation without disturbing the
caller's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["Progress", "seeded"]

# progress(step, max_steps, loss): what a caller is told while an editor trains (a UI's progress bar)
Progress = Callable[[int, int, float], None]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Fix torch's RNG inside the block (when seed is not None) without disturbing the caller's."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
