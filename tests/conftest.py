"""Shared fixtures: tiny random models for unit tests, the real default model for marked tests."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch at import, here and in the processes tests start

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from more; a shared CPU loses a lot


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
