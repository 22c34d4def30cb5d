"""What one edit costs through a long-lived Editor (as the app and the service hold one), over one
forward+backward pass of the same prompt and target: the README's cost column.

One warm-up edit (the record before `--start`: context prefixes, key statistics and the preserver are
built then, once per Editor), then each record edited and reverted, one at a time. Per edit: the
whole `edit` call, the forward+backward pass measured just before it (median of 3), their ratio, the
record's timings (compute, apply, guard); then the medians. `--profile N` prints the N costliest
calls (cProfile, cumulative) over the measured edits. Run it with nothing else on the machine: the
ratio reads low beside other jobs (the short pass suffers more than the long edit).

    python bench/bench_edit_cost.py --method alphaedit --split val --start 1700 --n 12 --threads 1
    python bench/bench_edit_cost.py --method mend --start 1700 --n 12 --profile 30
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch
from bench_editing import forward_backward_ms
from records import counterfact_split

import factedit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="alphaedit")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--start", type=int, default=1700, help="first measured record (the one before warms up)")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (JSON value)")
    parser.add_argument("--score", action="store_true", help="the Editor scores each edit (score=True)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest calls")
    args = parser.parse_args()
    if args.start < 1:
        parser.error("--start must be >= 1: the record before it warms the Editor up")
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}
    records = counterfact_split(args.split)[args.start - 1 : args.start + args.n]
    model, tok = factedit.load_model()
    editor = factedit.Editor(args.method, tokenizer=tok, score=args.score, **overrides)
    warm = records[0]
    editor.revert(model, editor.edit(model, warm["prompt"], warm["target_new"], subject=warm.get("subject")).id)
    profile = cProfile.Profile()
    rows = []
    for record in records[1:]:
        pass_ms = forward_backward_ms(model, tok, record, repeats=3)
        profile.enable()
        t = time.perf_counter()
        edit = editor.edit(model, record["prompt"], record["target_new"], subject=record.get("subject"))
        edit_ms = (time.perf_counter() - t) * 1000
        profile.disable()
        editor.revert(model, edit.id)
        steps = getattr(getattr(editor._impl, "last_values", None), "steps", None)  # locate-then-edit's v* steps
        rows.append({"case_id": record.get("case_id"), "edit_ms": round(edit_ms), "pass_ms": round(pass_ms),
                     "ratio": round(edit_ms / pass_ms, 2), "v_steps": steps,
                     **{k: round(v) for k, v in edit.timings.items() if k != "edit_ms"}})
        print(json.dumps(rows[-1]), flush=True)
    editor.close()
    span = f"{args.split}[{args.start}:{args.start + args.n}]"
    print(f"\n{args.method} {overrides} on CounterFact {span}, {torch.get_num_threads()} torch thread(s)")
    print(json.dumps({"edit_s": round(statistics.median(r["edit_ms"] for r in rows) / 1000, 3),
                      "pass_s": round(statistics.median(r["pass_ms"] for r in rows) / 1000, 3),
                      "ratio": round(statistics.median(r["ratio"] for r in rows), 2)}))
    if args.profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)


if __name__ == "__main__":
    main()
