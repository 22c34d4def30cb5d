"""Benchmark of the foundation's bars on the default model (issue 2). Prints one table.

For each method: one edit at a time on the first N CounterFact records, measured, then reverted and
checked bit for bit. CounterFact protocol from mean per-token log-probs: ES = share with
P(o*) > P(oᶜ) on the edit prompt, PS the same on the rephrase, NS = share of neighbourhood prompts
with P(oᶜ) > P(o*). What the model then says (factedit.scoring.said, the rules of `factedit eval`):
"said" = share whose greedy continuation of the edit prompt is the new target, "said para" the same on
the rephrase, "chat" / "chat para" the prompt / rephrase asked through the chat template and judged on
the reply, "said para, same question" = "said para" over the records whose rephrase is a paraphrase
(not one of CounterFact's generation prompts, factedit.core.rephrases), "nbr kept" = share of
neighbourhood prompts whose greedy continuation the edit leaves unchanged. Speed: median compute time
of an edit over the median forward+backward pass of the same model on the same text (all weights
trainable), measured in the same run; revert and journal append times; model load from the cache.

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
from records import counterfact_split

import factedit
from factedit.core.cost import forward_backward_ms as core_forward_backward_ms
from factedit.core.rephrases import rephrase_kind
from factedit.core.request import encode_prompt, encode_target
from factedit.editing.journal import Journal
from factedit.evaluation import EvalRecord
from factedit.evaluation.loaders import REPHRASE_CHOICES
from factedit.scoring.said import normalise, said_scores
from factedit.scoring.sequences import pad_id_of, score_sequences

# generation-based shares, see the docstring
SAID = ("said", "said_para", "said_para_same_question", "chat", "chat_para", "nbr_kept")


def mean_logprobs(model, tok, prompt: str, targets: list[str]) -> list[float]:
    pairs = [(encode_prompt(tok, prompt), encode_target(tok, prompt, t)) for t in targets]
    return [s.mean_logprob for s in score_sequences(model, pairs, pad_id_of(tok))]


def said_case(record: dict) -> EvalRecord:
    return EvalRecord(
        index=0, prompt=record["prompt"], target_new=record["target_new"], target_true=record["ground_truth"],
        paraphrases=(record["rephrase_prompt"],),
        neighborhood=((record["locality_prompt"], record["locality_ground_truth"]),),
    )


def record_rephrase_kind(record: dict) -> str:
    """What the record's `rephrase_prompt` is: "paraphrase" or "generation" (factedit.core.rephrases)."""
    return rephrase_kind(record["rephrase_prompt"], record.get("subject"))


def with_rephrase_kind(records: list[dict], kind: str) -> list[dict]:
    """The records whose `rephrase_prompt` is of `kind` ("paraphrase" or "generation"), or all of them
    for "all"."""
    return records if kind == "all" else [r for r in records if record_rephrase_kind(r) == kind]


def add_rephrase_option(parser: argparse.ArgumentParser) -> None:
    """--rephrase: which records a benchmark takes (with_rephrase_kind)."""
    parser.add_argument("--rephrase", default="all", choices=REPHRASE_CHOICES,
                        help="only the first n records from --start whose rephrase prompt is of this kind")


def counterfact_outcome(model, tok, record: dict, said_before=None) -> dict[str, float]:
    """ES/PS/NS of one record and, with `said_before` (the unedited model's said_scores), what the model
    says now (None where the tokenizer has no chat template)."""
    new, true = record["target_new"], record["ground_truth"]
    es = mean_logprobs(model, tok, record["prompt"], [new, true])
    ps = mean_logprobs(model, tok, record["rephrase_prompt"], [new, true])
    ns = mean_logprobs(model, tok, record["locality_prompt"], [new, record["locality_ground_truth"]])
    outcome: dict[str, float] = {"es": es[0] > es[1], "ps": ps[0] > ps[1], "ns": ns[1] > ns[0]}
    if said_before is not None:
        now = said_scores(model, tok, [said_case(record)])[0]
        outcome.update(said=now.prompt_ok, said_para=now.para_ok[0],
                       nbr_kept=normalise(now.neigh_texts[0]) == normalise(said_before.neigh_texts[0]))
        if record_rephrase_kind(record) == "paraphrase":
            outcome["said_para_same_question"] = now.para_ok[0]  # not after a generation prompt (rephrases.py)
        if now.chat_ok is not None:
            outcome.update(chat=now.chat_ok[0], chat_para=now.chat_ok[1])
    return outcome


def forward_backward_ms(model, tok, record: dict, repeats: int = 5) -> float:
    ids = encode_prompt(tok, record["prompt"]) + encode_target(tok, record["prompt"], record["target_new"])
    return core_forward_backward_ms(model, torch.tensor([ids]), repeats=repeats)


def share(outcomes: list[dict], key: str) -> float | None:
    values = [o[key] for o in outcomes if key in o]
    return sum(values) / len(values) if values else None


def run_method(method, overrides, model, tok, records, said_before) -> dict:
    editor = factedit.Editor(method, tokenizer=tok, score=False, **overrides)
    outcomes, edit_ms, revert_ms, ratios, exact = [], [], [], [], 0
    for record, before in zip(records, said_before, strict=True):
        fwd_bwd = forward_backward_ms(model, tok, record, repeats=1)
        edit = editor.edit(model, record["prompt"], record["target_new"], subject=record.get("subject"))
        outcomes.append(counterfact_outcome(model, tok, record, before))
        t = time.perf_counter()
        editor.revert(model, edit.id)
        revert_ms.append((time.perf_counter() - t) * 1000)
        edit_ms.append(edit.timings["compute_ms"] + edit.timings["apply_ms"])
        ratios.append(edit_ms[-1] / fwd_bwd)
        base = editor._state.base
        exact += all(torch.equal(dict(model.named_parameters())[n], base[n]) for n in edit.params) and not any(
            m._forward_hooks for m in model.modules())  # an edit's side modules (grace, tpatcher, adapter) are gone
    editor.close()  # releases the model for the next method's Editor
    return {
        "method": method, **{k: share(outcomes, k) for k in ("es", "ps", "ns", *SAID)},
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
    add_rephrase_option(parser)
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--unedited", action="store_true", help="also report the unedited ES/PS/NS")
    parser.add_argument("--no-generation", action="store_true", help="skip the greedy / chat checks")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 is faster when other jobs share the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        method, _, field = key.partition(".")
        overrides.setdefault(method, {})[field] = json.loads(value)

    split = counterfact_split(args.split)
    records = with_rephrase_kind(split[args.start :], args.rephrase)[: args.n]
    model, tok = factedit.load_model()
    said_before = (
        [None] * len(records) if args.no_generation else said_scores(model, tok, [said_case(r) for r in records])
    )
    rows = []
    if args.unedited:
        outcomes = [counterfact_outcome(model, tok, r, b) for r, b in zip(records, said_before, strict=True)]
        rows.append({"method": "none", **{k: share(outcomes, k) for k in ("es", "ps", "ns", *SAID)}})
    for method in args.methods.split(","):
        rows.append(run_method(method, overrides.get(method, {}), model, tok, records, said_before))
        print(json.dumps(rows[-1]), flush=True)

    header = ["method", "ES", "said", "chat", "PS", "said para", "chat para", "said para, same question", "NS",
              "nbr kept", "exact reverts", "median edit ms", "edit / fwd+bwd", "revert ms"]
    fmt = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    chosen = f" ({args.rephrase} rephrase prompts only: {len(records)} records from {args.start})" * (
        args.rephrase != "all")
    print(f"\nCounterFact {args.split}[{args.start or ''}:{args.start + args.n}]{chosen}, default model, "
          f"one edit at a time then revert (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells = [r["method"], *(fmt(r.get(k)) for k in ("es", "said", "chat", "ps", "said_para", "chat_para",
                                                            "said_para_same_question", "ns", "nbr_kept")),
                 r.get("exact", "-"),
                 f"{r['edit_ms']:.0f}" if "edit_ms" in r else "-", f"{r['ratio']:.1f}x" if "ratio" in r else "-",
                 f"{r['revert_ms']:.1f}" if "revert_ms" in r else "-"]
        print("| " + " | ".join(cells) + " |")
    print(f"\njournal append (ft_l default layers): {journal_append_ms(model, tok, records[0]):.1f} ms; "
          f"default model load from cache: {load_ms():.0f} ms")


if __name__ == "__main__":
    main()
