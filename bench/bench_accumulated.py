"""Where the drift of many kept edits comes from: the edits of a journal summed per matrix, read apart.

    python bench/bench_accumulated.py runs/eval/seq200-val1700-b/journal-alphaedit.sqlite

For each edited matrix: the singular values of ΣΔW (every edit in the journal, active or reverted,
summed) beside W's largest, and ‖ΣΔW‖ beside ‖W‖; then the reference text's perplexity over the
unedited model's (the `drift/ppl_ratio` of an evaluation) with all of ΣΔW, with one matrix's alone,
with ΣΔW's largest singular values removed, and (`--each`) with each edit's delta alone, to see whether a
few edits carry the drift. Nothing is written: the sums enter through
`functional_call` (reference_perplexity's `params`).
"""

from __future__ import annotations

import argparse

import torch

import factedit
from factedit.editing.journal import Journal
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("journal")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--remove", default="1,10,30", help="numbers of largest singular values to remove")
    parser.add_argument("--each", action="store_true", help="also the drift of each edit alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = factedit.load_model()
    texts = reference_texts("samples")
    weights = {n: p.detach() for n, p in model.named_parameters()}
    edits = journal_edits(args.journal)
    total: dict[str, torch.Tensor] = {}
    for _, deltas in edits:
        for name, d in deltas.items():
            total[name] = total[name] + d if name in total else d
    base = reference_perplexity(model, tok, texts)

    def ratio(changes: dict[str, torch.Tensor]) -> float:
        return reference_perplexity(model, tok, texts, params={n: weights[n] + d for n, d in changes.items()}) / base

    print(f"{len(edits)} edits; drift with all of them: {ratio(total):.3f}x")
    svd = {}
    for name, d in total.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)  # d (out, in)
        svd[name] = (u, s, vh)
        top10 = float((s[:10] ** 2).sum() / (s**2).sum())
        largest = float(torch.linalg.svdvals(weights[name])[0])
        print(f"{name}: ||dW|| {float(d.norm()):.1f} (||W|| {float(weights[name].norm()):.1f}); singular values "
              f"{', '.join(f'{float(x):.1f}' for x in s[:5])} ... (W's largest {largest:.1f}); "
              f"top 10 hold {top10:.0%} of ||dW||^2; drift with this matrix alone {ratio({name: d}):.3f}x")
    for k in (int(x) for x in args.remove.split(",")):
        kept = {}
        for name, (u, s, vh) in svd.items():
            rest = s.clone()
            rest[:k] = 0
            kept[name] = (u * rest) @ vh
        print(f"drift without each matrix's {k} largest singular values: {ratio(kept):.3f}x")

    if args.each:
        alone = sorted(((ratio(deltas), what) for what, deltas in edits), reverse=True)
        values = torch.tensor([r for r, _ in alone])
        excess = values - 1  # each edit's own excess perplexity
        print(f"each edit alone: median {float(values.median()):.4f}x, max {float(values.max()):.4f}x; the 10% largest "
              f"carry {float(excess[: max(1, len(alone) // 10)].sum() / excess.sum()):.0%} of the summed excess")
        for r, what in alone[:5]:
            print(f"  {r:.4f}x  {what}")


if __name__ == "__main__":
    main()
