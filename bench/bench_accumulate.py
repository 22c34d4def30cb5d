"""Benchmark of edits that accumulate (issue 10), one table for every method.

For each method, through `factedit eval` (factedit.evaluation.run_eval) on CounterFact val records
[start, start + n):
- sequential: n edits one after another (or `--sequential-batch` facts per kept edit_batch), never
  reverted; every edit re-measured after the last one
  (ES/PS/NS, the CounterFact protocol), what the model then says (gen/prompt, gen/paraphrase,
  gen/chat: factedit.scoring.said's greedy and chat rules; gen/neighbour_kept), retention two ways
  (seq/retention teacher-forced, gen/retention by generation: share whose whole target is still the
  greedy continuation), drift (perplexity of the reference text over the unedited model's) at every
  checkpoint, then every edit reverted and the touched weights checked with torch.equal;
- batch: the first `batch` of those records in one `edit_batch`, measured, drift, reverted.
The unedited model's NS on the same records is printed beside them.

    python bench/bench_accumulate.py --methods mend,ft_l --start 300 --n 200 --batch 64
    python bench/bench_accumulate.py --methods mend --n 1000 --checkpoints 100,200,500 --skip-batch
    python bench/bench_accumulate.py --methods ft_l --n 200 --no-generation     # teacher-forced only
    python bench/bench_accumulate.py --methods alphaedit --start 100 --n 50 --rephrase paraphrase --skip-batch

Outputs (summary.json, report.md, plots, cases) go to --out/<mode>; a run started again continues.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from bench_editing import add_rephrase_option

from factedit.evaluation.config import DataConfig, EvalConfig, MethodRun
from factedit.evaluation.runner import run_eval
from factedit.paths import PACKAGE_DIR

# data/errors: edits refused (by the drift guard, for mend); the cf/ figures cover the applied ones.
# gen/*: what the model says (greedy continuation, chat reply, neighbours' continuations unchanged).
COLUMNS = ("cf/es", "gen/prompt", "cf/ps", "gen/paraphrase", "gen/paraphrase_prompts", "gen/chat", "cf/ns",
           "gen/neighbour_kept",
           "seq/retention", "gen/retention", "drift/ppl_ratio", "drift/ppl_ratio_max", "revert/exact",
           "data/errors", "time/edit_ms")


def evaluate(methods, mode: str, start: int, n: int, out: Path, checkpoints, threads: int,
             generation: bool = True, sequential_batch: int = 1, rephrase: str = "all") -> dict:
    config = EvalConfig(
        methods=tuple(MethodRun(m) for m in ["none", *methods]),
        data=DataConfig(path=PACKAGE_DIR / "data/counterfact/val.json", name="counterfact", format="counterfact"),
        out=out, n=n, start=start, mode=mode, batch_size=n, checkpoints=tuple(checkpoints), threads=threads,
        generation=generation, sequential_batch=sequential_batch, rephrase=rephrase,
    )
    return run_eval(config).summary


def table(rows: list[tuple[str, str, int, dict, dict]]) -> str:
    head = "| method | mode | edits | " + " | ".join(COLUMNS) + " | NS unedited |"
    lines = [head, "|---|---|---:|" + "---:|" * (len(COLUMNS) + 1)]
    for method, mode, edits, values, baseline in rows:
        cells = []
        for key in COLUMNS:
            value = values.get(key)
            if value is None:
                cells.append("–")
            else:
                cells.append(f"{value:.1f}" if key.endswith("_ms") else f"{value:.0f}" if key == "data/errors"
                             else f"{value:.3f}")
        lines.append(f"| {method} | {mode} | {edits} | " + " | ".join(cells) + f" | {baseline['cf/ns']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="mend,ft_l,ft,lora")
    parser.add_argument("--start", type=int, default=300, help="first val record (the ones before were tuned on)")
    parser.add_argument("--n", type=int, default=200, help="sequential edits")
    parser.add_argument("--batch", type=int, default=64, help="facts in the one edit_batch")
    parser.add_argument("--checkpoints", default="10,50,100,200,500,1000")
    parser.add_argument("--sequential-batch", type=int, default=1,
                        help="sequential: facts per kept edit_batch (e.g. --n 1000 --sequential-batch 100)")
    add_rephrase_option(parser)
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--no-generation", action="store_true", help="skip the gen/* checks (faster)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-accumulate")
    parser.add_argument("--json", default=None, help="also write the table's figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    checkpoints = [int(c) for c in args.checkpoints.split(",") if int(c) <= args.n]
    rows = []
    if not args.skip_sequential:
        summary = evaluate(methods, "sequential", args.start, args.n, Path(args.out) / "sequential", checkpoints,
                           args.threads, not args.no_generation, args.sequential_batch, args.rephrase)
        for method in methods:
            rows.append((method, "sequential", args.n, summary["metrics"][method], summary["baseline"]))
            curve = summary["sequential"][method]["checkpoints"]
            print(f"{method} sequential curve:", [
                (c["edits"], round(c["metrics"].get("seq/retention", float("nan")), 3),
                 round(c["metrics"].get("gen/retention", float("nan")), 3),
                 round(c["metrics"].get("drift/ppl_ratio", float("nan")), 3)) for c in curve
            ], "(edits, retention teacher-forced, retention greedy, ppl ratio)")
    if not args.skip_batch:
        summary = evaluate(methods, "batch", args.start, args.batch, Path(args.out) / "batch", (), args.threads,
                           not args.no_generation, rephrase=args.rephrase)
        for method in methods:
            rows.append((method, "batch", args.batch, summary["metrics"][method], summary["baseline"]))
    chosen = f", only records whose rephrase prompt is a {args.rephrase}" * (args.rephrase != "all")
    print(f"\nCounterFact val[{args.start}:...]{chosen}, default model, {args.threads} threads")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{"method": r[0], "mode": r[1], "edits": r[2], **r[3]} for r in rows],
                                              indent=1))


if __name__ == "__main__":
    main()
