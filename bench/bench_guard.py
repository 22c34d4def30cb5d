"""Benchmark of the drift guard: how closely each guard setting follows the drift it stands for, and
what it costs per edit.

`--n` sequential `mend` edits (guard off, so drift is free to grow) on CounterFact train records
[start, start + n). After every edit, each guard setting (texts per group × tokens per text) gives its
ratio exactly as the Editor's guard does (the next group and the worst so far, reads started at the
lowest edited block, no disk cache); every `--every` edits the truth is measured: the perplexity of
all 64 shipped samples at `--truth-tokens` tokens over the unedited model's. Prints, per setting, the
guard's ratio over the truth (median, min, max), the first edit where each crossed `--mark`, and the
median seconds per check.

    python bench/bench_guard.py --n 100 --threads 2
    python bench/bench_guard.py --n 40 --every 2 --mark 1.5 --config '{"preserve": {"threshold": 0.5, "ridge": 1.0}}'

(the second: MEND at its training ridge, whose larger updates carry drift past the guard's 1.5× bound)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import factedit
from factedit.evaluation.loaders import load_records
from factedit.model.loading import load_model
from factedit.paths import PACKAGE_DIR
from factedit.safety.drift import DriftGuard, GuardConfig, reference_perplexity
from factedit.safety.reference import reference_texts
from factedit.safety.safeguards import lowest_touched_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--start", type=int, default=1000, help="first CounterFact train record")
    parser.add_argument("--settings", default="4x24,4x48,2x48,8x24", help="texts x max_tokens, comma-separated")
    parser.add_argument("--every", type=int, default=4, help="edits between two truth measurements")
    parser.add_argument("--truth-tokens", type=int, default=48)
    parser.add_argument("--mark", type=float, default=1.2, help="report the first edit past this ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default="{}", help="mend config overrides, JSON")
    parser.add_argument("--out", default="runs/bench-guard.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model()
    records = load_records(PACKAGE_DIR / "data/counterfact/train.json").records[args.start : args.start + args.n]
    editor = factedit.Editor("mend", tokenizer=tok, guard=None, **json.loads(args.config))
    guards = {}
    for setting in args.settings.split(","):
        texts, tokens = (int(x) for x in setting.split("x"))
        guards[setting] = DriftGuard(GuardConfig(texts=texts, max_tokens=tokens))
    samples = reference_texts("samples")
    base_truth = reference_perplexity(model, tok, samples, max_tokens=args.truth_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with out.open("w") as log:
        for step, record in enumerate(records, 1):
            editor.edit(model, record.prompt, record.target_new)
            state = editor._state
            base, start = state.base_values(list(state.base)), lowest_touched_block(model, state)
            row: dict = {"edit": step}
            for setting, guard in guards.items():
                began = time.perf_counter()
                row[setting] = guard.ratio(model, tok, base, start)
                row[f"{setting}_s"] = time.perf_counter() - began
            if step % args.every == 0:
                row["truth"] = reference_perplexity(model, tok, samples, max_tokens=args.truth_tokens) / base_truth
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()

    measured = [r for r in rows if "truth" in r]
    print(f"{args.n} sequential mend edits (guard off, config {args.config}), "
          f"CounterFact train[{args.start}:{args.start + args.n}]; "
          f"truth: {len(samples)} samples × {args.truth_tokens} tokens, last {measured[-1]['truth']:.3f}×, "
          f"first past {args.mark}: {next((r['edit'] for r in measured if r['truth'] > args.mark), '-')}")
    print("| setting | tokens read per group | ratio / truth: median | min | max | first past mark | s per check |")
    print("|---|---|---|---|---|---|---|")
    for setting in guards:
        texts, tokens = (int(x) for x in setting.split("x"))
        over = [r[setting] / r["truth"] for r in measured]
        first = next((r["edit"] for r in rows if r[setting] > args.mark), "-")
        seconds = statistics.median(r[f"{setting}_s"] for r in rows)
        print(f"| {setting} | {texts * tokens} | {statistics.median(over):.3f} | {min(over):.3f} | {max(over):.3f} "
              f"| {first} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
