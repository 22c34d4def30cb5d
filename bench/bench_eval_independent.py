"""An independent check of the unedited CounterFact ES and NS that `factedit eval method=none` reports.

Plain transformers, one unpadded forward pass per (prompt, object) sequence, no factedit scoring or
metrics code: P(o) = exp(mean log p of o's tokens after the prompt), the object joined to the
prompt with one space (the design's join rule, re-implemented here). ES = share of records with
P(new) > P(true) on the edit prompt; NS = share with P(true neighbour answer) > P(new) on the
neighbourhood prompt.

    factedit eval method=none data=counterfact n=100 out=runs/eval/none-100
    python bench/bench_eval_independent.py --n 100 --summary runs/eval/none-100/summary.json

Exits 1 when a summary is given and ES or NS differ from it by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]


def joined(prompt: str, target: str) -> str:
    return target if target[:1].isspace() or prompt[-1:].isspace() else " " + target


@torch.no_grad()
def mean_logprob(model, tok, prompt: str, target: str) -> float:
    p = tok(prompt)["input_ids"]
    t = tok(joined(prompt, target), add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([p + t])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(p) - 1 + i, tid]) for i, tid in enumerate(t)) / len(t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "counterfact" / "val.json"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument(
        "--model", default=None, help="a local model folder (default: the converted default model)"
    )
    parser.add_argument("--summary", default=None, help="summary.json of a `factedit eval method=none` run")
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args()

    if args.model is None:
        from factedit.editing.loading import default_model_folder  # only to find the cached folder

        args.model = str(default_model_folder())
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    records = json.loads(Path(args.data).read_text())[: args.n]
    start = time.perf_counter()
    es, ns = [], []
    for r in records:
        new, true = (
            mean_logprob(model, tok, r["prompt"], r["target_new"]),
            mean_logprob(model, tok, r["prompt"], r["ground_truth"]),
        )
        es.append(new > true)
        n_new = mean_logprob(model, tok, r["locality_prompt"], r["target_new"])
        n_true = mean_logprob(model, tok, r["locality_prompt"], r["locality_ground_truth"])
        ns.append(n_true > n_new)
    ours = {"cf/es": sum(es) / len(es), "cf/ns": sum(ns) / len(ns)}
    print(
        f"independent, {len(records)} records ({time.perf_counter() - start:.0f} s): "
        f"ES {ours['cf/es']:.4f}  NS {ours['cf/ns']:.4f}"
    )
    if args.summary is None:
        return 0
    summary = json.loads(Path(args.summary).read_text())
    theirs = summary["metrics"]["none"] if "none" in summary["metrics"] else summary["baseline"]
    worst = 0.0
    for key, value in ours.items():
        diff = abs(value - theirs[key])
        worst = max(worst, diff)
        print(f"{key}: independent {value:.4f}  factedit eval {theirs[key]:.4f}  |diff| {diff:.4f}")
    ok = worst <= args.tolerance and not math.isnan(worst)
    print("agree within", args.tolerance if ok else f"NO: differ by {worst:.4f} > {args.tolerance}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
