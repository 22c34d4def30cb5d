"""Cache files of tensors (key statistics, the drift guard's store): safetensors with their provenance in
the metadata, written atomically (a killed write never leaves a half file where a read finds it), and
read back only when their metadata says they were written for the same inputs. A damaged file reads as
missing, so the caller computes it again and rewrites it instead of failing on every use."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path

LOG = logging.getLogger(__name__)


def read_cached_tensors(path: Path, expected: Mapping[str, str]) -> dict[str, torch.Tensor] | None:
    """Every tensor of the file at `path` when its metadata holds each of `expected`'s items; None when
    it is missing, was written for other inputs, or is damaged (with a warning)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            if any(meta.get(key) != value for key, value in expected.items()):
                return None
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as error:
        LOG.warning("ignoring the damaged cache file %s: %s", path, error)
        return None


def write_cached_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bool:
    """Write `tensors` (moved to the CPU, made contiguous) with `meta` to `path`, replacing it atomically.
    A cache that cannot be written (a read-only folder, a full disk) costs only the next process's time:
    warn and return False instead of failing the edit that computed it."""
    try:
        with atomic_path(path) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata=dict(meta))
    except OSError as error:
        LOG.warning("could not write the cache file %s (it will be computed again next time): %s", path, error)
        return False
    return True
