"""Reference text shipped with factedit (`factedit/resources/reference/`, provenance in its README).

samples     text sampled from the unedited default model after 64 openings written for factedit:
            its perplexity under an edited model, over the unedited model's, is the drift figure
            (evaluation, the guard)
statements  2,000 true statements from CounterFact's train split: with the samples, the corpus whose
            inputs to the edited matrices are the keys an edit must preserve (`keys.py`)
heldout     text the unedited default model writes after openings the samples do not touch, outside
            the key corpus: the drift read where no preserving solve looked (evaluation)
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

KINDS = ("samples", "statements", "heldout")


def reference_texts(kind: str) -> list[str]:
    """The texts of one shipped reference file (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown reference text {kind!r}; known: {', '.join(KINDS)}")
    data = resources.files("factedit").joinpath("resources", "reference", f"{kind}.json").read_text("utf-8")
    return list(json.loads(data)["texts"])


def key_corpus() -> list[str]:
    """The corpus whose keys edits preserve: the samples, then the statements."""
    return reference_texts("samples") + reference_texts("statements")


def texts_sha256(texts: list[str]) -> str:
    """Identity of a corpus (recorded with statistics computed on it)."""
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
