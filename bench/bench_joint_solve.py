"""Whether one solve for many facts leaks more than single solves of the same facts, keys alone.

    python bench/bench_joint_solve.py                       # CounterFact val[400:500], blocks 3, 5, 7
    python bench/bench_joint_solve.py --records train:3000:100 --layers 3,4,5,6,7 --weights 1500,15000

For the keys an edit writes at (the subject's last token, averaged over the context prefixes, as
`alphaedit` reads them on the unedited model) and unit values, MEMIT's covariance solve
ΔW = R Kᵀ (K Kᵀ + w C)⁻¹ of all the facts at once against each fact solved alone: the leak into the
corpus keys' outputs, ‖ΔW C^½‖² = tr(Kᵀ A⁻¹ C A⁻¹ K) (C = E[kkᵀ] over the key corpus), and the share of
each value delivered at its own key. A ratio near 1 says the keys do not interact: a batch that drifts
more than single solves asks its blocks to write larger values (docs/locate.md).

    python bench/bench_joint_solve.py --across-blocks --records train:3000:30 --layers 3,4,5,6,7

`--across-blocks`: one fact at a time, its value written by every block at once, as the blocks' MLP
outputs add up in the residual stream. MEMIT's split (each block delivers an equal share, with its own
least-C-norm row) against one solve over the blocks' keys side by side (J = blocks × in wide, C_J their
joint second moment over the key corpus, a ridge × its mean diagonal): the residual leak E_t (Σ_l x_lᵀ
k_t,l)² per unit delivered, median over the facts, read on the key corpus (cross-block terms included)
and on the held-out reference text, which no solve saw.
"""

from __future__ import annotations

import argparse

import torch
from bench_key_spectrum import subject_keys

import factedit
from factedit.locate.method import own_moments
from factedit.model.specs import mlp_param_names, module_of
from factedit.safety.keys import corpus_keys
from factedit.safety.reference import key_corpus, reference_texts


def leak_and_delivered(keys: torch.Tensor, moment: torch.Tensor, weight: float) -> tuple[float, float]:
    """(leak, mean share delivered) of the joint solve for keys (in, N) with unit values."""
    solved = torch.linalg.solve(keys @ keys.T + weight * moment, keys)  # (in, N): A⁻¹ K
    leak = float(torch.einsum("in,ij,jn->", solved, moment, solved))
    return leak, float(torch.diagonal(keys.T @ solved).mean())


def joint_keys(model, tok, names: list[str], texts: list[str]) -> torch.Tensor:
    """(T, J): every non-padding token's inputs to the down projections `names`, side by side."""
    modules = [module_of(n) for n in names]
    return torch.cat([torch.cat([keys[m] for m in modules], dim=1) for keys in corpus_keys(model, tok, modules, texts)])


def across_blocks(model, tok, names: list[str], records: str, ridges: list[float]) -> None:
    """The `--across-blocks` table (module docstring)."""
    keys = subject_keys(model, tok, names, records)
    facts = torch.cat([keys[n].double() for n in names], dim=1)  # (N, J)
    width = keys[names[0]].shape[1]
    corpus = torch.zeros(facts.shape[1], facts.shape[1], dtype=torch.float64)  # (J, J)
    tokens, texts = 0, key_corpus()
    for start in range(0, len(texts), 512):  # the corpus in parts: (T, J) of it all is 0.8 GB
        part = joint_keys(model, tok, names, texts[start : start + 512])
        corpus += (part.T @ part).double()
        tokens += part.shape[0]
    corpus /= tokens
    heldout = joint_keys(model, tok, names, reference_texts("heldout")).double()  # (T_h, J)

    def rows(moment: torch.Tensor, keys: torch.Tensor, ridge: float) -> torch.Tensor:
        """(N, d): the least-C-norm rows delivering 1 at each key (N, d)."""
        regular = moment + ridge * moment.diagonal().mean() * torch.eye(moment.shape[0], dtype=moment.dtype)
        x = torch.linalg.solve(regular, keys.T).T
        return x / (x * keys).sum(1, keepdim=True)

    print(f"{facts.shape[0]} facts, {tokens} corpus tokens, {heldout.shape[0]} held-out tokens")
    print("| ridge | solve | corpus leak | held-out leak |")
    print("|---:|---|---:|---:|")
    for ridge in ridges:
        blocks = [slice(i * width, (i + 1) * width) for i in range(len(names))]
        split = torch.cat([rows(corpus[b, b], facts[:, b], ridge) / len(names) for b in blocks], dim=1)
        for label, x in (("split (MEMIT)", split), ("joint", rows(corpus, facts, ridge))):
            on_corpus = (x * (corpus @ x.T).T).sum(1)  # (N,)
            on_heldout = ((heldout @ x.T) ** 2).mean(0)  # (N,)
            print(f"| {ridge:g} | {label} | {float(on_corpus.median()):.3g} | {float(on_heldout.median()):.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="val:400:100", help="SPLIT:START:N CounterFact records")
    parser.add_argument("--layers", default="3,5,7", help="blocks whose down projection is read")
    parser.add_argument("--weights", default="1500,3000,6000,15000", help="covariance weights w")
    parser.add_argument("--across-blocks", action="store_true", help="one fact over every block at once")
    parser.add_argument("--ridges", default="0.001,0.01,0.1", help="--across-blocks: × the mean diagonal")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = factedit.load_model()
    names = mlp_param_names(model, [int(x) for x in args.layers.split(",")], "out")
    if args.across_blocks:
        across_blocks(model, tok, names, args.records, [float(r) for r in args.ridges.split(",")])
        return
    keys = subject_keys(model, tok, names, args.records)  # {name: (N, in)}
    moments = own_moments(model, tok, names)
    print("| matrix | w | joint leak | single leaks summed | ratio | delivered joint | delivered single |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        k, c = keys[name].double().T, moments[name].double()  # (in, N), (in, in)
        for weight in (float(w) for w in args.weights.split(",")):
            joint, delivered = leak_and_delivered(k, c, weight)
            alone = [leak_and_delivered(k[:, i : i + 1], c, weight) for i in range(k.shape[1])]
            single = sum(a for a, _ in alone)
            print(f"| {name} | {weight:g} | {joint:.4g} | {single:.4g} | {joint / single:.2f} | {delivered:.3f} | "
                  f"{sum(d for _, d in alone) / len(alone):.3f} |")


if __name__ == "__main__":
    main()
