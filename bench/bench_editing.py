"""Benchmark of the foundation's bars on the default model (issue 2). Prints one table.

For each method: one edit at a time on the first N CounterFact records, measured, then reverted and
checked bit for bit. CounterFact protocol from mean per-token log-probs: ES = share with
P(o*) > P(oᶜ) on the edit prompt, PS the same on the rephrase, NS = share of neighbourhood prompts
with P(oᶜ) > P(o*). Speed: median compute time of an edit over the median forward+backward pass of
the same model on the same text (all weights trainable), measured in the same run; revert and journal
append times; model load from the cache.

    python bench/bench_editing.py                       # ft, ft_l, lora on val[:100]
    python bench/bench_editing.py --methods ft_l --n 30 --split train --set ft_l.lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import factedit
from factedit.editing.journal import Journal
from factedit.editing.request import encode_prompt, encode_target
from factedit.editing.scoring import pad_id_of, score_sequences
from factedit.paths import PACKAGE_DIR


def mean_logprobs(model, tok, prompt: str, targets: list[str]) -> list[float]:
    pairs = [(encode_prompt(tok, prompt), encode_target(tok, prompt, t)) for t in targets]
    return [s.mean_logprob for s in score_sequences(model, pairs, pad_id_of(tok))]


def counterfact_outcome(model, tok, record: dict) -> dict[str, bool]:
    new, true = record["target_new"], record["ground_truth"]
    es = mean_logprobs(model, tok, record["prompt"], [new, true])
    ps = mean_logprobs(model, tok, record["rephrase_prompt"], [new, true])
    ns = mean_logprobs(model, tok, record["locality_prompt"], [new, record["locality_ground_truth"]])
    return {"es": es[0] > es[1], "ps": ps[0] > ps[1], "ns": ns[1] > ns[0]}


def forward_backward_ms(model, tok, record: dict, repeats: int = 5) -> float:
    ids = encode_prompt(tok, record["prompt"]) + encode_target(tok, record["prompt"], record["target_new"])
    batch = torch.tensor([ids])
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        times.append((time.perf_counter() - t) * 1000)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def run_method(method, overrides, model, tok, records) -> dict:
    editor = factedit.Editor(method, tokenizer=tok, score=False, **overrides)
    outcomes, edit_ms, revert_ms, ratios, exact = [], [], [], [], 0
    for record in records:
        fwd_bwd = forward_backward_ms(model, tok, record, repeats=1)
        edit = editor.edit(model, record["prompt"], record["target_new"], subject=record.get("subject"))
        outcomes.append(counterfact_outcome(model, tok, record))
        t = time.perf_counter()
        editor.revert(model, edit.id)
        revert_ms.append((time.perf_counter() - t) * 1000)
        edit_ms.append(edit.timings["compute_ms"] + edit.timings["apply_ms"])
        ratios.append(edit_ms[-1] / fwd_bwd)
        base = editor._state.base
        exact += all(torch.equal(dict(model.named_parameters())[n], base[n]) for n in edit.params)
    editor.close()  # releases the model for the next method's Editor
    share = lambda key: sum(o[key] for o in outcomes) / len(outcomes)  # noqa: E731
    return {
        "method": method, "es": share("es"), "ps": share("ps"), "ns": share("ns"),
        "exact": f"{exact}/{len(records)}", "edit_ms": statistics.median(edit_ms),
        "ratio": statistics.median(ratios), "revert_ms": statistics.median(revert_ms),
    }


def journal_append_ms(model, tok, record: dict, repeats: int = 5) -> float:
    """Median time of Journal.append for an ft_l edit (default layers), measured apart."""
    editor = factedit.Editor("ft_l", tokenizer=tok, score=False, max_steps=1)
    edit = editor.edit(model, record["prompt"], record["target_new"])
    base_hashes = {n: "0" * 64 for n in edit.params}
    times = []
    with tempfile.TemporaryDirectory() as tmp, Journal(Path(tmp) / "bench.sqlite") as journal:
        for i in range(repeats):
            copy = type(edit)(**{**edit.__dict__, "id": f"{edit.id}-{i}"})
            t = time.perf_counter()
            journal.append(copy, base_hashes)
            times.append((time.perf_counter() - t) * 1000)
    editor.revert(model, edit.id)
    editor.close()
    return statistics.median(times)


def load_ms() -> float:
    t = time.perf_counter()
    factedit.load_model()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="ft,ft_l,lora")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--start", type=int, default=0, help="first record (the bars use 0)")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--unedited", action="store_true", help="also report the unedited ES/PS/NS")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 is faster when other jobs share the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        method, _, field = key.partition(".")
        overrides.setdefault(method, {})[field] = json.loads(value)

    split = json.loads((PACKAGE_DIR / f"data/counterfact/{args.split}.json").read_text())
    records = split[args.start : args.start + args.n]
    model, tok = factedit.load_model()
    rows = []
    if args.unedited:
        outcomes = [counterfact_outcome(model, tok, r) for r in records]
        rows.append({"method": "none", **{k: sum(o[k] for o in outcomes) / len(outcomes) for k in ("es", "ps", "ns")}})
    for method in args.methods.split(","):
        rows.append(run_method(method, overrides.get(method, {}), model, tok, records))
        print(json.dumps(rows[-1]), flush=True)

    header = ["method", "ES", "PS", "NS", "exact reverts", "median edit ms", "edit / fwd+bwd", "revert ms"]
    print(f"\nCounterFact {args.split}[{args.start or ''}:{args.start + args.n}], default model, "
          f"one edit at a time then revert (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells = [r["method"], f"{r['es']:.2f}", f"{r['ps']:.2f}", f"{r['ns']:.2f}", r.get("exact", "-"),
                 f"{r['edit_ms']:.0f}" if "edit_ms" in r else "-", f"{r['ratio']:.1f}x" if "ratio" in r else "-",
                 f"{r['revert_ms']:.1f}" if "revert_ms" in r else "-"]
        print("| " + " | ".join(cells) + " |")
    print(f"\njournal append (ft_l default layers): {journal_append_ms(model, tok, records[0]):.1f} ms; "
          f"default model load from cache: {load_ms():.0f} ms")


if __name__ == "__main__":
    main()
