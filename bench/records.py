"""The CounterFact records the benchmarks read: the flat splits shipped inside the package
(factedit/data/counterfact/, provenance in factedit/data/README.md), as dicts in file order."""

from __future__ import annotations

import json

from factedit.paths import PACKAGE_DIR

SPLITS = ("train", "val")


def counterfact_split(split: str) -> list[dict]:
    """Every record of CounterFact `split` ("train" or "val"), in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown CounterFact split {split!r}; known: {', '.join(SPLITS)}")
    return json.loads((PACKAGE_DIR / "data" / "counterfact" / f"{split}.json").read_text())
