"""What the drift guard reads for one large `edit_batch`, against the drift evaluation reports.

One `edit_batch` of CounterFact val[start, start + n) with `--method` (guard on, as shipped); prints the
guard's reading (the edit record's `drift`), the perplexity ratio of all 64 shipped samples cut at the
guard's 24 tokens and in full (what `factedit eval` reports as drift/ppl_ratio), and each group of 4 at 24
tokens: how far the guard's sample stands from the whole for many facts at once.

    python bench/bench_guard_batch.py --method mend --start 1700 --n 64 --threads 1
"""

from __future__ import annotations

import argparse

import torch

import factedit
from factedit.core.errors import DriftError
from factedit.evaluation.loaders import load_records
from factedit.paths import PACKAGE_DIR
from factedit.safety.drift import GuardConfig, reference_perplexity
from factedit.safety.reference import reference_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="mend")
    parser.add_argument("--start", type=int, default=1700, help="first CounterFact val record")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = factedit.load_model()
    records = load_records(PACKAGE_DIR / "data/counterfact/val.json").records[args.start : args.start + args.n]
    texts = reference_texts("samples")
    cut = GuardConfig().max_tokens
    size = GuardConfig().texts
    groups = [texts[i : i + size] for i in range(0, len(texts) - size + 1, size)]

    def readings() -> tuple[float, float, list[float]]:
        return (reference_perplexity(model, tok, texts), reference_perplexity(model, tok, texts, max_tokens=cut),
                [reference_perplexity(model, tok, g, max_tokens=cut) for g in groups])

    base_full, base_cut, base_groups = readings()
    editor = factedit.Editor(args.method, tokenizer=tok, score=False)
    requests = [r.to_request() for r in records]
    try:
        record = editor.edit_batch(model, requests)
        print(f"guard read {record.drift:.3f}x: applied")
    except DriftError as error:
        print(f"guard refused at {error.ratio:.3f}x; measuring the edit with the guard off")
        editor.close()  # a model belongs to one Editor at a time
        editor = factedit.Editor(args.method, tokenizer=tok, score=False, guard=None)
        editor.edit_batch(model, requests)
    full, at_cut, by_group = readings()
    print(f"all {len(texts)} samples in full: {full / base_full:.3f}x; cut at {cut} tokens: {at_cut / base_cut:.3f}x")
    ratios = [g / b for g, b in zip(by_group, base_groups, strict=True)]
    print("groups of", size, "at", cut, "tokens:", " ".join(f"{r:.3f}" for r in ratios))


if __name__ == "__main__":
    main()
