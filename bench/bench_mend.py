"""Benchmark of the MEND editor on CounterFact (ROME-paper protocol), one edit at a time then revert.

    .venv/bin/python bench/bench_mend.py                       # the shipped editor, first 200 val records
    .venv/bin/python bench/bench_mend.py --checkpoint /tmp/mend-quick --n 200
    .venv/bin/python bench/bench_mend.py --config '{"extra_steps": 0}'     # one step, as published
    .venv/bin/python bench/bench_mend.py --method ultraedit               # the training-free editor

Per record: edit through `factedit.Editor("mend", tokenizer=tok, score=False)`, score the six
sequences with `score_sequences` (mean per-token log-prob of the new and the true object on the edit
prompt, the rephrase prompt and the neighbourhood prompt), revert, and check that the edited
parameters equal (torch.equal) a copy of their base taken before the first edit.

ES = share with mean logprob(target_new) > mean logprob(ground_truth) on the edit prompt;
PS = the same on rephrase_prompt; NS = share of locality_prompt with
mean logprob(locality_ground_truth) > mean logprob(target_new).
What the model then says (factedit.scoring.said's rules, as `factedit eval` judges them): gen/prompt
and gen/paraphrase, the new target is the greedy continuation; gen/chat, the chat reply to
"Complete the sentence: {prompt}" says it (and not the old object).

Timing (same run, medians): the MEND compute time of one edit and the whole Editor call (compute,
projection, apply, drift guard, key protection; score=False); one forward+backward of the base
model on the same text (prompt + target, mean NLL of the target, every parameter requiring grad, as
loaded); their ratios; and one `edit_batch` of 16 records against the median single edit.

Batch quality: the same records again, `--batch` facts per `edit_batch` call, each fact scored while
its batch's edit is applied (ES/PS/NS as above).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_editing import add_rephrase_option, record_rephrase_kind, with_rephrase_kind
from records import counterfact_split

import factedit
from factedit.core.cost import forward_backward_ms
from factedit.core.errors import DriftError
from factedit.core.request import encode_prompt, encode_target
from factedit.scoring.said import said_scores
from factedit.scoring.sequences import pad_id_of, score_sequences


def cf_scores(model, tok, rec) -> dict[str, float]:
    pairs = []
    for prompt, first, second in (
        (rec["prompt"], rec["target_new"], rec["ground_truth"]),
        (rec["rephrase_prompt"], rec["target_new"], rec["ground_truth"]),
        (rec["locality_prompt"], rec["target_new"], rec["locality_ground_truth"]),
    ):
        ids = encode_prompt(tok, prompt)
        pairs += [(ids, encode_target(tok, prompt, first)), (ids, encode_target(tok, prompt, second))]
    s = [x.mean_logprob for x in score_sequences(model, pairs, pad_id_of(tok))]
    return {"es": float(s[0] > s[1]), "ps": float(s[2] > s[3]), "ns": float(s[5] > s[4])}


@dataclass(frozen=True)
class SaidRecord:
    """A CounterFact record as the generation checks read it (said.SaidCase)."""

    prompt: str
    target_new: str
    target_true: str | None
    paraphrases: tuple[str, ...]
    neighborhood: tuple[tuple[str, str], ...] = ()
    locality: tuple[tuple[str, str], ...] = ()


def said(model, tok, rec) -> dict[str, float]:
    case = SaidRecord(rec["prompt"], rec["target_new"], rec["ground_truth"], (rec["rephrase_prompt"],))
    (scores,) = said_scores(model, tok, [case])
    out = {"said": float(scores.prompt_ok), "said_para": float(scores.para_ok[0])}
    if record_rephrase_kind(rec) == "paraphrase":
        out["said_para_same_question"] = out["said_para"]  # not after a generation prompt (rephrases.py)
    if scores.chat_ok:
        out["said_chat"] = float(scores.chat_ok[0])
    return out


def refused(unedited: dict[str, float], edited_keys) -> dict[str, float]:
    """A fact whose edit the drift guard refused counts as failed; the model is unchanged, so NS is the
    unedited model's."""
    return {key: unedited["ns"] if key == "ns" else 0.0 for key in edited_keys}


def mean(rows, key) -> float:
    """The mean of one figure over the facts, nan for none."""
    return sum(r[key] for r in rows) / len(rows) if rows else float("nan")


def median(values) -> float:
    """The median, nan for none (every edit refused)."""
    return statistics.median(values) if values else float("nan")


def fwd_bwd_ms(model, tok, rec) -> float:
    """One forward + backward of the base model on prompt + target (all parameters trainable; core.cost)."""
    ids = encode_prompt(tok, rec["prompt"]) + encode_target(tok, rec["prompt"], rec["target_new"])
    return forward_backward_ms(model, torch.tensor([ids]), repeats=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mend", choices=("mend", "ultraedit"))
    parser.add_argument("--checkpoint", default=None, help="MEND checkpoint dir (default: the shipped one)")
    parser.add_argument("--config", default="{}", help="JSON of method config overrides")
    parser.add_argument("--n", type=int, default=200, help="n records of val.json from --start")
    parser.add_argument("--start", type=int, default=0, help="first record")
    add_rephrase_option(parser)
    parser.add_argument("--split", default="val", choices=("val", "train"), help="CounterFact split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="size of the edit_batch timing")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = factedit.load_model()
    records = counterfact_split(args.split)
    records = with_rephrase_kind(records[args.start :], args.rephrase)[: args.n]
    overrides = json.loads(args.config)
    if args.method == "mend":
        overrides["checkpoint"] = args.checkpoint
    editor = factedit.Editor(args.method, tokenizer=tok, score=False, **overrides)
    names = editor._impl.param_names(model)
    params = dict(model.named_parameters())
    base = {n: params[n].detach().clone() for n in names}

    unedited = [cf_scores(model, tok, r) for r in records]
    # The rows a scored fact gets (said's depend on the chat template): a refused fact gets the same, failed.
    single_keys, batch_keys = tuple(unedited[0] | said(model, tok, records[0])), tuple(unedited[0])
    for r in records[:3]:  # warm-up
        fwd_bwd_ms(model, tok, r)
        with contextlib.suppress(DriftError):  # refused: nothing applied, counted in the run below
            editor.revert(model, editor.edit(model, r["prompt"], r["target_new"]).id)

    flags, compute_ms, edit_ms, fb_ms, exact, refusals = [], [], [], [], True, {"single": 0, "batch": 0}
    for rec, before in zip(records, unedited, strict=True):
        fb_ms.append(fwd_bwd_ms(model, tok, rec))
        try:
            record = editor.edit(model, rec["prompt"], rec["target_new"])
        except DriftError:
            refusals["single"] += 1
            flags.append(refused(before, single_keys))
            continue
        compute_ms.append(record.timings["compute_ms"])
        edit_ms.append(record.timings["edit_ms"])
        flags.append(cf_scores(model, tok, rec) | said(model, tok, rec))
        editor.revert(model, record.id)
        exact &= all(torch.equal(params[n], base[n]) for n in names)

    single_ms = median(compute_ms)
    batch_ms, batch_edit_ms = [], []
    requests = [{"prompt": r["prompt"], "target": r["target_new"]} for r in records[: args.batch]]
    for _ in range(3):
        try:
            record = editor.edit_batch(model, requests)
        except DriftError:
            break
        batch_ms.append(record.timings["compute_ms"])
        batch_edit_ms.append(record.timings["edit_ms"])
        editor.revert(model, record.id)
        exact &= all(torch.equal(params[n], base[n]) for n in names)

    # The same records edited `--batch` at a time (whole batches only): each fact scored in its batch's edit.
    batch_flags = []
    for start in range(0, len(records) - args.batch + 1, args.batch):
        chunk = records[start : start + args.batch]
        try:
            record = editor.edit_batch(model, [{"prompt": r["prompt"], "target": r["target_new"]} for r in chunk])
        except DriftError:  # every fact of a refused batch counts as failed
            refusals["batch"] += 1
            batch_flags += [refused(u, batch_keys) for u in unedited[start : start + args.batch]]
            continue
        batch_flags += [cf_scores(model, tok, r) for r in chunk]
        editor.revert(model, record.id)
        exact &= all(torch.equal(params[n], base[n]) for n in names)

    figures = {
        "method": args.method,
        "config": args.config,
        "checkpoint": (args.checkpoint or "shipped") if args.method == "mend" else "-",
        "n": len(records), "start": args.start, "rephrase": args.rephrase,
        "edit/es": mean(flags, "es"), "edit/ps": mean(flags, "ps"), "loc/ns": mean(flags, "ns"),
        "gen/prompt": mean(flags, "said"), "gen/paraphrase": mean(flags, "said_para"),
        "gen/paraphrase_prompts": mean([f for f in flags if "said_para_same_question" in f], "said_para_same_question"),
        "gen/chat": mean([f for f in flags if "said_chat" in f], "said_chat"),
        "unedited/es": mean(unedited, "es"), "unedited/ps": mean(unedited, "ps"), "unedited/ns": mean(unedited, "ns"),
        f"batch{args.batch}/n": len(batch_flags),
        f"batch{args.batch}/es": mean(batch_flags, "es"), f"batch{args.batch}/ps": mean(batch_flags, "ps"),
        f"batch{args.batch}/ns": mean(batch_flags, "ns"),
        "refused/single": refusals["single"], f"refused/batch{args.batch}_calls": refusals["batch"],
        "revert/exact": exact,
        "time/edit_compute_ms": single_ms,
        "time/edit_total_ms": median(edit_ms),
        "time/fwd_bwd_ms": median(fb_ms),
        "time/edit_over_fwd_bwd": single_ms / median(fb_ms),
        # the whole Editor call with score=False: compute, projection, apply, guard, key protection
        "time/edit_total_over_fwd_bwd": median(edit_ms) / median(fb_ms),
        # nan when the guard refused the timed batch
        f"time/batch{args.batch}_compute_ms": median(batch_ms),
        f"time/batch{args.batch}_over_single": median(batch_ms) / single_ms,
        f"time/batch{args.batch}_total_over_single_total": median(batch_edit_ms) / median(edit_ms),
        "threads": args.threads,
    }
    width = max(len(k) for k in figures)
    where = f"{args.split}[{args.start}:{args.start + len(records)}]"
    print(f"{args.method} on CounterFact {where}, one edit at a time then revert")
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
