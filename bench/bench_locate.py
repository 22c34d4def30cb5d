"""Locate-then-edit methods one edit at a time, with what each edit cost and did, record by record.

The same measures as bench/bench_editing.py (ES/PS/NS, said, chat, neighbours kept, cost as edit time
over one forward+backward pass of the prompt measured just before it), plus, per edit, the v* steps
taken, the final target NLL over the prefixed prompts, the norm of v* - h over ‖h‖ and the greedy
continuation of the paraphrase: what to read when tuning.

    python bench/bench_locate.py --method alphaedit --split train --start 20 --n 20 --threads 1
    python bench/bench_locate.py --method alphaedit --set v_lr=1.0 --set v_stop_nll=0.1 --out runs/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_editing import (
    add_rephrase_option,
    counterfact_outcome,
    forward_backward_ms,
    mean_logprobs,
    record_rephrase_kind,
    said_case,
    share,
    with_rephrase_kind,
)
from records import counterfact_split

import factedit
from factedit.scoring.said import normalise, said_scores


def outcome_and_para(model, tok, record: dict, before) -> tuple[dict, str | None]:
    """bench_editing.counterfact_outcome's figures, and the greedy continuation of the paraphrase."""
    if before is None:
        return counterfact_outcome(model, tok, record), None
    new, true = record["target_new"], record["ground_truth"]
    es = mean_logprobs(model, tok, record["prompt"], [new, true])
    ps = mean_logprobs(model, tok, record["rephrase_prompt"], [new, true])
    ns = mean_logprobs(model, tok, record["locality_prompt"], [new, record["locality_ground_truth"]])
    now = said_scores(model, tok, [said_case(record)])[0]
    kept = normalise(now.neigh_texts[0]) == normalise(before.neigh_texts[0])
    outcome = {"es": es[0] > es[1], "ps": ps[0] > ps[1], "ns": ns[1] > ns[0], "said": now.prompt_ok,
               "said_para": now.para_ok[0], "nbr_kept": kept}
    if now.chat_ok is not None:
        outcome.update(chat=now.chat_ok[0], chat_para=now.chat_ok[1])
    return outcome, now.para_texts[0]


def edit_one(editor: factedit.Editor, model, tok, record: dict, before) -> dict:
    """One edit, measured, then reverted; the record's figures as a flat dict."""
    fwd_bwd = forward_backward_ms(model, tok, record, repeats=1)
    t = time.perf_counter()
    edit = editor.edit(model, record["prompt"], record["target_new"], subject=record.get("subject"))
    edit_ms = (time.perf_counter() - t) * 1000
    values = editor._impl.last_values
    outcome, para = outcome_and_para(model, tok, record, before)
    editor.revert(model, edit.id)
    return {
        "case_id": record.get("case_id"), **{k: float(v) for k, v in outcome.items()},
        "edit_ms": edit_ms, "ratio": edit_ms / fwd_bwd, "steps": values.steps, "nll": float(values.nll.max()),
        "shift": float(((values.target - values.initial).norm(dim=1) / values.initial.norm(dim=1)).max()),
        "para": para, "para_kind": record_rephrase_kind(record),
        "target": record["target_new"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="alphaedit", choices=["alphaedit", "memit", "rome"])
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--n", type=int, default=20)
    add_rephrase_option(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (JSON value)")
    parser.add_argument("--no-generation", action="store_true", help="skip the greedy / chat checks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write one JSON line per record here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}
    records = counterfact_split(args.split)
    records = with_rephrase_kind(records[args.start :], args.rephrase)[: args.n]
    model, tok = factedit.load_model()
    before = [None] * len(records) if args.no_generation else said_scores(model, tok, [said_case(r) for r in records])
    unedited = [counterfact_outcome(model, tok, r) for r in records]
    editor = factedit.Editor(args.method, tokenizer=tok, score=False, **overrides)
    rows = []
    for record, said_before in zip(records, before, strict=True):
        rows.append(edit_one(editor, model, tok, record, said_before))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with Path(args.out).open("a") as out:
                out.write(json.dumps(rows[-1]) + "\n")
    editor.close()
    summary = {k: share(rows, k) for k in ("es", "said", "chat", "ps", "said_para", "chat_para", "ns", "nbr_kept")}
    for kind in ("paraphrase", "generation"):  # what is said after a paraphrase, and after a generation prompt
        summary[f"said_para/{kind}"] = share([r for r in rows if r["para_kind"] == kind], "said_para")
    summary.update(ns_unedited=share(unedited, "ns"), ratio=statistics.median(r["ratio"] for r in rows),
                   edit_s=statistics.median(r["edit_ms"] for r in rows) / 1000,
                   steps=statistics.mean(r["steps"] for r in rows))
    span = f"{args.split}[{args.start}:{args.start + args.n}]"
    if args.rephrase != "all":
        span = f"the first {args.n} records of {args.split}[{args.start}:] whose rephrase prompt is a {args.rephrase}"
    print(f"\n{args.method} {overrides} on CounterFact {span}, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(json.dumps({k: round(v, 3) if v is not None else None for k, v in summary.items()}))


if __name__ == "__main__":
    main()
