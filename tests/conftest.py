"""Shared fixtures: tiny random models for unit tests, the real default model for marked tests."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch at import, here and in the processes tests start

import pytest

# The files that take longest (measured: `pytest --durations=0`, cold caches first), longest first. With
# `--dist loadfile --no-loadscope-reorder` (make test) xdist hands files to workers in collection order,
# so these start first and the many short files fill in around them; its default order (most tests
# first) left the one-test browser file for last, running alone for half a minute. A file missing from
# the list only runs later; a renamed one only loses its place.
SLOWEST_FIRST = (
    "test_contract.py", "test_app_browser.py", "test_export.py", "test_modules_methods.py", "test_mend_default.py",
    "test_app.py", "test_serve_process.py", "test_journal.py", "test_server_attacks.py", "test_eval_run.py",
    "test_locate.py", "test_server.py", "test_peft_ia3.py", "test_exact_revert_property.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny models gain nothing from more threads; a shared CPU loses a lot. (Set here, not at import:
    xdist's controller process, which runs no test, then never imports torch.)"""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny():
    """A fresh tiny random Llama and its tokenizer (a new model per test: tests edit it)."""
    from tiny_models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M), loaded once per session. Tests must leave it as
    they found it (revert what they edit)."""
    import factedit

    return factedit.load_model()
