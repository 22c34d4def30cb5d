"""How long reopening a long journal and undoing all of it takes: a copy of a journal is replayed onto a
freshly loaded model (`Editor.attach`), then `revert_all` is timed and the weights are checked against
the base bit for bit (sha256 of every parameter). The journal itself is not changed.

    python bench/bench_revert_all.py runs/acc-ue-cw15000-1000/journal-ultraedit.sqlite \
        --method ultraedit --config '{"preserve": {"cov_weight": 15000}}'
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import factedit
from factedit.model.weights import tensor_sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("journal", type=Path)
    parser.add_argument("--method", required=True, help="the journal's method (its Editor)")
    parser.add_argument("--config", default="{}", help="the method's config overrides, as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = factedit.load_model()
    base = {name: tensor_sha256(p) for name, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / args.journal.name
        shutil.copy(args.journal, copy)
        with factedit.Editor(args.method, tokenizer=tokenizer, journal=copy, **json.loads(args.config)) as editor:
            start = time.perf_counter()
            editor.attach(model)
            replay_s = time.perf_counter() - start
            statuses = collections.Counter(r.status for r in editor.history)
            start = time.perf_counter()
            reverted = editor.revert_all(model)
            revert_s = time.perf_counter() - start
    exact = all(tensor_sha256(p) == base[name] for name, p in model.named_parameters())
    print(f"journal: {dict(statuses)}; replay {replay_s:.1f} s; revert_all of {len(reverted)} edits "
          f"{revert_s:.2f} s; base bit for bit: {exact}")


if __name__ == "__main__":
    main()
