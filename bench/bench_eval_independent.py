"""An independent check of the unedited CounterFact ES, NS and greedy success that `factedit eval
method=none` reports.

Plain transformers, one unpadded forward pass per (prompt, object) sequence, no factedit scoring or
metrics code: P(o) = exp(mean log p of o's tokens after the prompt), the object joined to the
prompt with one space (the design's join rule, re-implemented here). ES = share of records with
P(new) > P(true) on the edit prompt; NS = share with P(true neighbour answer) > P(new) on the
neighbourhood prompt.

Greedy success (what the model says), re-implemented: `model.generate` on each prompt alone (no
padding, no batching), len(target tokens) + 2 new tokens, stopped at eos; success when the continuation,
NFKC-normalised, casefolded and whitespace-collapsed, starts with the target so normalised, at a word
boundary. gen/prompt = that share for the new target on the edit prompt, gen/paraphrase on the rephrase.
With --summary, the continuations are also compared one by one with the texts factedit's batched
generation stored in cases.jsonl beside it (the unedited model's `pre.said`), and likewise the chat
replies ("Complete the sentence: {prompt}" through the chat template, 16 tokens).

    factedit eval method=none data=counterfact n=100 out=runs/eval/none-100
    python bench/bench_eval_independent.py --n 100 --summary runs/eval/none-100/summary.json

Exits 1 when a summary is given and ES or NS differ from it by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import unicodedata
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


def said_first(text: str, target: str) -> bool:
    def norm(s: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", s).casefold().split())

    return re.match(re.escape(norm(target)) + r"(?!\w)", norm(text)) is not None


@torch.no_grad()
def greedy(model, tok, ids: list[int], n: int) -> str:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def continuation(model, tok, prompt: str, target: str) -> str:
    n = len(tok(joined(prompt, target), add_special_tokens=False)["input_ids"]) + 2
    return greedy(model, tok, tok(prompt)["input_ids"], n)


def chat_reply(model, tok, prompt: str) -> str | None:
    if not tok.chat_template:
        return None
    text = tok.apply_chat_template([{"role": "user", "content": f"Complete the sentence: {prompt.strip()}"}],
                                   add_generation_prompt=True, tokenize=False)
    return greedy(model, tok, tok(text, add_special_tokens=False)["input_ids"], 16)


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
        from factedit.model.loading import default_model_folder  # only to find the cached folder

        args.model = str(default_model_folder())
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    records = json.loads(Path(args.data).read_text())[: args.n]
    start = time.perf_counter()
    es, ns, said, said_para, texts = [], [], [], [], []
    for r in records:
        prompt_text = continuation(model, tok, r["prompt"], r["target_new"])
        para_text = continuation(model, tok, r["rephrase_prompt"], r["target_new"])
        said.append(said_first(prompt_text, r["target_new"]))
        said_para.append(said_first(para_text, r["target_new"]))
        texts.append((prompt_text, para_text, chat_reply(model, tok, r["prompt"]) if args.summary else None))
        new, true = (
            mean_logprob(model, tok, r["prompt"], r["target_new"]),
            mean_logprob(model, tok, r["prompt"], r["ground_truth"]),
        )
        es.append(new > true)
        n_new = mean_logprob(model, tok, r["locality_prompt"], r["target_new"])
        n_true = mean_logprob(model, tok, r["locality_prompt"], r["locality_ground_truth"])
        ns.append(n_true > n_new)
    ours = {
        "cf/es": sum(es) / len(es),
        "cf/ns": sum(ns) / len(ns),
        "gen/prompt": sum(said) / len(said),
        "gen/paraphrase": sum(said_para) / len(said_para),
    }
    print(
        f"independent, {len(records)} records ({time.perf_counter() - start:.0f} s): "
        + "  ".join(f"{k} {v:.4f}" for k, v in ours.items())
    )
    if args.summary is None:
        return 0
    summary = json.loads(Path(args.summary).read_text())
    theirs = summary["metrics"]["none"] if "none" in summary["metrics"] else summary["baseline"]
    worst = 0.0
    stored = Path(args.summary).with_name("cases.jsonl")
    if stored.exists():  # the texts themselves, one by one: batched generation vs generate() alone
        pre = {}
        for line in stored.read_text().splitlines():
            row = json.loads(line)
            if row.get("pre", {}).get("said"):
                pre.setdefault(row["index"], row["pre"]["said"])
        checked = [(i, t) for i, t in enumerate(texts) if i in pre]
        same = sum(
            t[0] == pre[i]["prompt_text"] and [t[1]] == pre[i]["para_texts"]
            and (t[2] is None or t[2] == (pre[i]["chat_replies"] or [None])[0])
            for i, t in checked
        )
        print(f"generated texts equal to factedit's batched generation: {same}/{len(checked)} records")
        if same != len(checked):
            worst = float("inf")
    for key in [k for k in ours if k not in theirs]:
        print(f"{key}: not in the summary (a run with generation=false?)")
        ours.pop(key)
    for key, value in ours.items():
        diff = abs(value - theirs[key])
        worst = max(worst, diff)
        print(f"{key}: independent {value:.4f}  factedit eval {theirs[key]:.4f}  |diff| {diff:.4f}")
    ok = worst <= args.tolerance and not math.isnan(worst)
    print("agree within", args.tolerance if ok else f"NO: differ by {worst:.4f} > {args.tolerance}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
