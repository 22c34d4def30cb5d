"""Where the drift of many kept edits comes from: the edits of a journal summed per matrix, read apart.

    python bench/bench_accumulated.py runs/eval/seq200-val1700-b/journal-alphaedit.sqlite
    python bench/bench_accumulated.py runs/tune21b/grad0.25-shrink4-refine2/journal-alphaedit.sqlite \
        --remove 1,3,10 --records train:3000
    python bench/bench_accumulated.py runs/t21c/full-cw1500/journal-alphaedit.sqlite --remove 0 --texts heldout
    python bench/bench_accumulated.py RUN/journal-alphaedit.sqlite --remove 0 --leak --scale 0.5,0.7,1.4 --each

For each edited matrix: the singular values of ΣΔW (every edit in the journal, active or reverted, summed)
beside W's largest, and ‖ΣΔW‖ beside ‖W‖; then the reference text's perplexity over the unedited model's (the
`drift/ppl_ratio` of an evaluation) with all of ΣΔW, with one matrix's alone, with ΣΔW's largest singular
values removed or capped (`--cap`), and (`--each`) with each edit's delta alone, to see whether a few edits
carry the drift. `--leak` gives each matrix's leak into the corpus keys' outputs, ‖ΣΔW C^½‖² (C = E[kkᵀ] over
the key corpus, the term MEMIT's covariance solve weighs), beside the sum of each edit's own leak (a ratio
near 1: the edits' leaks are orthogonal and add in quadrature, not in step) and W's own output energy ‖W
C^½‖²; `--scale` reads the drift with ΣΔW scaled, to see how it grows with the size of the accumulated change;
`--each --leak` also ranks each edit's leak against its own drift (does a large leak mark the edits that move
the text?). `--texts heldout` reads the drift on the shipped held-out text (bench/make_heldout_text.py),
outside the key corpus that preserving editors solve against (the shipped samples are in it, so their drift
may flatter them). With `--records SPLIT:START` (the CounterFact records the journal's edits were made from,
in order) each reading also gives the share of them whose new target beats the true one (ES) and whose every
target token is the argmax. Nothing is written: the sums enter through `functional_call`
(reference_perplexity's `params`).
"""

from __future__ import annotations

import argparse

import torch
from records import counterfact_split
from torch.func import functional_call

import factedit
from factedit.core.request import encode_prompt, encode_target
from factedit.editing.journal import Journal
from factedit.locate.method import own_moments
from factedit.safety.drift import reference_perplexity
from factedit.safety.reference import reference_texts


def journal_edits(path: str) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """[(prompt → target, {name: ΔW})] for every edit of the journal, oldest first, active or reverted."""
    edits = []
    with Journal(path, create=False) as journal:
        for edit_id in journal.order():
            record = journal.record(edit_id)
            what = "; ".join(f"{r.prompt} -> {r.target}" for r in record.requests)
            edits.append((what, {name: d.materialize(torch.float32) for name, d in record.delta.items()}))
    return edits


def corpus_leak(delta: torch.Tensor, moment: torch.Tensor) -> float:
    """‖ΔW C^½‖² = tr(ΔW C ΔWᵀ): the summed squared change of the outputs over the corpus keys, per key."""
    return float(torch.einsum("oi,ij,oj->", delta, moment, delta))  # delta (out, in), moment (in, in)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two (N,) tensors (ties broken by order)."""
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()  # (2, N)
    return float(torch.corrcoef(ranks)[0, 1])


def reach(model, tok, records: list[dict], changed: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(ES, share with every target token the argmax) of `records` on the weights `changed` replaces."""
    beats = said = 0
    for record in records:
        nll = {}
        for key in ("target_new", "ground_truth"):
            prompt = encode_prompt(tok, record["prompt"])
            target = encode_target(tok, record["prompt"], record[key])  # the project's join rule
            with torch.no_grad():
                logits = functional_call(model, changed, (torch.tensor([prompt + target]),)).logits[0]
            logits = logits[len(prompt) - 1 : -1].float()  # (T, V): the positions predicting the target
            nll[key] = float(-torch.log_softmax(logits, -1)[range(len(target)), target].mean())
            if key == "target_new":
                said += bool((logits.argmax(-1) == torch.tensor(target)).all())
        beats += nll["target_new"] < nll["ground_truth"]
    return beats / len(records), said / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("journal")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--remove", default="1,10,30", help="numbers of largest singular values to remove")
    parser.add_argument("--cap", default="", help="singular values of each ΣΔW to cap at, e.g. 20,15,10")
    parser.add_argument("--each", action="store_true", help="also the drift of each edit alone")
    parser.add_argument("--leak", action="store_true", help="each matrix's leak into the corpus keys' outputs")
    parser.add_argument("--scale", default="", help="factors to scale ΣΔW by, e.g. 0.5,0.7,1.4")
    parser.add_argument("--records", help="SPLIT:START of the CounterFact records the edits were made from")
    parser.add_argument("--texts", choices=("samples", "heldout"), default="samples",
                        help="drift on the shipped samples (as evaluations read it) or on held-out text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = factedit.load_model()
    texts = reference_texts(args.texts)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    edits = journal_edits(args.journal)
    total: dict[str, torch.Tensor] = {}
    for _, deltas in edits:
        for name, d in deltas.items():
            total[name] = total[name] + d if name in total else d
    base = reference_perplexity(model, tok, texts)

    records = None
    if args.records:
        split, start = args.records.split(":")
        data = counterfact_split(split)
        records = data[int(start) : int(start) + len(edits)]

    def changed(changes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: weights[n] + d for n, d in changes.items()}

    def ratio(params: dict[str, torch.Tensor]) -> float:
        return reference_perplexity(model, tok, texts, params=params) / base

    def read(changes: dict[str, torch.Tensor]) -> str:
        params = changed(changes)  # once for both readings
        drift = f"drift {ratio(params):.3f}x"
        if records is None:
            return drift
        es, said = reach(model, tok, records, params)
        return f"{drift}, ES {es:.2f}, every target token the argmax {said:.2f}"

    print(f"{len(edits)} edits; with all of them: {read(total)}")
    svd = {}
    for name, d in total.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)  # d (out, in)
        svd[name] = (u, s, vh)
        top10 = float((s[:10] ** 2).sum() / (s**2).sum())
        largest = float(torch.linalg.svdvals(weights[name])[0])
        print(f"{name}: ||dW|| {float(d.norm()):.1f} (||W|| {float(weights[name].norm()):.1f}); singular values "
              f"{', '.join(f'{float(x):.1f}' for x in s[:5])} ... (W's largest {largest:.1f}); "
              f"top 10 hold {top10:.0%} of ||dW||^2; drift with this matrix alone {ratio(changed({name: d})):.3f}x")
    for k in (int(x) for x in args.remove.split(",") if x and int(x) > 0):
        kept = {}
        for name, (u, s, vh) in svd.items():
            rest = s.clone()
            rest[:k] = 0
            kept[name] = (u * rest) @ vh
        print(f"without each matrix's {k} largest singular values: {read(kept)}")
    for cap in (float(x) for x in args.cap.split(",") if x):
        capped = {name: (u * s.clamp(max=cap)) @ vh for name, (u, s, vh) in svd.items()}
        print(f"each matrix's singular values capped at {cap:g}: {read(capped)}")

    for factor in (float(x) for x in args.scale.split(",") if x):
        print(f"ΣΔW × {factor:g}: {read({name: factor * d for name, d in total.items()})}")
    moments: dict[str, torch.Tensor] = {}  # name -> (in, in) E[kkᵀ] over the key corpus
    if args.leak:
        moments = {name: c.to(total[name].dtype) for name, c in own_moments(model, tok, sorted(total)).items()}
        for name, d in total.items():
            whole = corpus_leak(d, moments[name])
            own = sum(corpus_leak(deltas[name], moments[name]) for _, deltas in edits if name in deltas)
            print(f"{name}: leak ||dW C^1/2||^2 {whole:.4g}, the edits' own leaks summed {own:.4g} (ratio "
                  f"{whole / own:.2f}); W's output energy {corpus_leak(weights[name], moments[name]):.4g}")
    if args.each:
        alone = sorted(((ratio(changed(deltas)), what, deltas) for what, deltas in edits), key=lambda x: -x[0])
        values = torch.tensor([r for r, _, _ in alone])
        excess = values - 1  # each edit's own excess perplexity
        print(f"each edit alone: median {float(values.median()):.4f}x, max {float(values.max()):.4f}x; the 10% largest "
              f"carry {float(excess[: max(1, len(alone) // 10)].sum() / excess.sum()):.0%} of the summed excess "
              f"({float(excess.sum()):.4f})")
        for r, what, _ in alone[:5]:
            print(f"  {r:.4f}x  {what}")
        if args.leak:
            leaks = torch.tensor([sum(corpus_leak(d, moments[n]) for n, d in deltas.items()) for _, _, deltas in alone])
            top = leaks.argsort(descending=True)[: max(1, len(alone) // 10)]
            print(f"each edit's leak against its excess: rank correlation {rank_correlation(leaks, excess):.2f}; "
                  f"the 10% largest leaks carry {float(excess[top].sum() / excess.sum()):.0%} of the summed excess")


if __name__ == "__main__":
    main()
