"""Cache files and small state files: written atomically by one writer (core/atomic.py), and a cache
that cannot be written costs time, never an edit."""

from __future__ import annotations

import contextlib
import threading

import torch
from helpers import snapshot
from tiny_models import tiny_model

import factedit
from factedit.core.atomic import write_text
from factedit.core.cachefiles import read_cached_tensors, write_cached_tensors


def test_writers_in_threads_never_share_a_temporary_file(tmp_path):
    """Each write goes through its own temporary file: whatever the interleaving, the file holds one
    writer's whole content (a pid-only temporary name let two threads write into one file)."""
    path = tmp_path / "stats.safetensors"
    errors = []

    def writer(value: float) -> None:
        try:
            for _ in range(20):
                assert write_cached_tensors(path, {"x": torch.full((256, 256), value)}, {"for": "test"})
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    tensors = read_cached_tensors(path, {"for": "test"})
    assert tensors is not None and torch.equal(tensors["x"], torch.full((256, 256), tensors["x"][0, 0].item()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]  # no temporary file left


def test_a_failed_write_leaves_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "origins.json"
    write_text(path, "old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", broken)
    with contextlib.suppress(OSError):
        write_text(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["origins.json"]


def test_an_edit_succeeds_when_the_cache_folder_cannot_be_written(tmp_path, monkeypatch):
    """ft_l computes key statistics and the guard its reference: both are cached on disk. A cache path
    that cannot be a folder (a read-only or full disk in life) must not fail the edit."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FACTEDIT_CACHE", str(blocker))
    model, tok = tiny_model("llama")
    base = snapshot(model)
    with factedit.Editor("ft_l", tokenizer=tok, guard=1.5, layers=(-1,), lr=0.1, norm_constraint=0.1,
                         max_steps=5) as editor:
        record = editor.edit(model, "The capital of France is", "Rome")
        assert record.params and any(not torch.equal(p, base[n]) for n, p in model.named_parameters())
        editor.revert(model, record.id)
    for name, p in model.named_parameters():
        assert torch.equal(p, base[name]), name


def test_the_guard_store_reads_back_onto_the_models_device(tmp_path, monkeypatch):
    """A store written by one process comes back on the device the model is on (a GPU in life; the
    "meta" device here, which this CPU has), not on the CPU where safetensors reads it."""
    from factedit.safety.guard_store import GuardStore

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    hidden = {3: torch.randn(2, 5, 8)}
    GuardStore("fp", "m", ["a text"], 4, 64, torch.float32, torch.device("meta")).save(0, 12.5, hidden)
    base, loaded = GuardStore("fp", "m", ["a text"], 4, 64, torch.float32, torch.device("meta")).load(0)
    assert base == 12.5 and loaded[3].device.type == "meta" and loaded[3].shape == (2, 5, 8)


def test_a_derived_file_missing_a_required_tensor_is_computed_and_written_again(tmp_path, monkeypatch):
    """A file an older version wrote (without a tensor this one keeps) is rewritten once, then read."""
    from factedit.safety.keys import cached_derivative

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    calls = []

    def compute(keys: tuple[str, ...]):
        def make() -> dict[str, torch.Tensor]:
            calls.append(keys)
            return {k: torch.ones(3) for k in keys}
        return make

    old = cached_derivative("fp", ["a text"], "m", "tag", compute(("basis",)))
    assert set(old) == {"basis"} and len(calls) == 1
    args = ("fp", ["a text"], "m", "tag", compute(("basis", "along")))
    assert set(cached_derivative(*args, required=("basis", "along"))) == {"basis", "along"} and len(calls) == 2
    assert set(cached_derivative(*args, required=("basis", "along"))) == {"basis", "along"} and len(calls) == 2
    assert set(cached_derivative(*args)) == {"basis", "along"} and len(calls) == 2  # nothing required: as read
