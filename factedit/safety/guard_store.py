"""The drift guard's per-model cache on disk: for each group of reference texts, the base model's
perplexity of it and the hidden states entering the blocks guard reads have started at (replay.py).

Both depend only on the base weights, the texts and how they are cut, so they are computed once per
model, not once per process: a fresh process guards its first edits at the cost of the edited blocks
and the head instead of two full passes per group. One file per group, written atomically:

    cache_dir()/guard/<base fingerprint>/<sha256[:16] of texts, group size, max tokens, dtype, device>/
        group-<i>.safetensors      base_perplexity (float64 scalar), block.<L> (B, T, H) per block L

with the provenance in the file's metadata. A cache that cannot be written is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .._version import __version__
from ..core.cachefiles import read_cached_tensors, write_cached_tensors
from ..model.loading import cache_dir
from .reference import texts_sha256

STORE_FORMAT = "factedit.guard/1"


class GuardStore:
    """Base perplexities and block inputs of the guard's text groups for one base model."""

    def __init__(
        self, fingerprint: str, model_id: str, texts: list[str], group_size: int, max_tokens: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.meta = {
            "format": STORE_FORMAT, "model_id": model_id, "model_fingerprint": fingerprint,
            "texts_sha256": texts_sha256(texts), "group_size": str(group_size), "max_tokens": str(max_tokens),
            "dtype": str(dtype), "device_type": device.type, "factedit_version": __version__,
        }
        self.device = torch.device(device)
        keyed = ("texts_sha256", "group_size", "max_tokens", "dtype", "device_type")
        key = json.dumps({k: self.meta[k] for k in keyed}, sort_keys=True)
        self.folder = cache_dir() / "guard" / fingerprint / hashlib.sha256(key.encode()).hexdigest()[:16]

    def _path(self, group: int) -> Path:
        return self.folder / f"group-{group}.safetensors"

    def load(self, group: int) -> tuple[float | None, dict[int, torch.Tensor]]:
        """(base perplexity or None, {block: its input (B, T, H)} on the model's device) of one group;
        nothing if not cached."""
        expected = {"format": STORE_FORMAT, "texts_sha256": self.meta["texts_sha256"]}
        tensors = read_cached_tensors(self._path(group), expected) or {}
        base = tensors.pop("base_perplexity", None)
        hidden = {int(name.split(".", 1)[1]): t.to(self.device)
                  for name, t in tensors.items() if name.startswith("block.")}
        return (float(base) if base is not None else None), hidden

    def save(self, group: int, base: float, hidden: dict[int, torch.Tensor]) -> None:
        """Write one group's entry (replacing the file atomically)."""
        tensors = {"base_perplexity": torch.tensor(base, dtype=torch.float64)}
        tensors.update({f"block.{layer}": h for layer, h in hidden.items()})
        write_cached_tensors(self._path(group), tensors, {**self.meta, "group": str(group)})  # warns if it cannot
