"""Whether one solve for many facts leaks more than single solves of the same facts, keys alone.

    python bench/bench_joint_solve.py                       # CounterFact val[400:500], blocks 3, 5, 7
    python bench/bench_joint_solve.py --records train:3000:100 --layers 3,4,5,6,7 --weights 1500,15000

For the keys an edit writes at (the subject's last token, averaged over the context prefixes, as
`alphaedit` reads them on the unedited model) and unit values, MEMIT's covariance solve
ΔW = R Kᵀ (K Kᵀ + w C)⁻¹ of all the facts at once against each fact solved alone: the leak into the
corpus keys' outputs, ‖ΔW C^½‖² = tr(Kᵀ A⁻¹ C A⁻¹ K) (C = E[kkᵀ] over the key corpus), and the share of
each value delivered at its own key. A ratio near 1 says the keys do not interact: a batch that drifts
more than single solves asks its blocks to write larger values (docs/locate.md).
"""

from __future__ import annotations

import argparse

import torch
from bench_key_spectrum import subject_keys

import factedit
from factedit.locate.method import own_moments
from factedit.model.specs import mlp_param_names


def leak_and_delivered(keys: torch.Tensor, moment: torch.Tensor, weight: float) -> tuple[float, float]:
    """(leak, mean share delivered) of the joint solve for keys (in, N) with unit values."""
    solved = torch.linalg.solve(keys @ keys.T + weight * moment, keys)  # (in, N): A⁻¹ K
    leak = float(torch.einsum("in,ij,jn->", solved, moment, solved))
    return leak, float(torch.diagonal(keys.T @ solved).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="val:400:100", help="SPLIT:START:N CounterFact records")
    parser.add_argument("--layers", default="3,5,7", help="blocks whose down projection is read")
    parser.add_argument("--weights", default="1500,3000,6000,15000", help="covariance weights w")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = factedit.load_model()
    names = mlp_param_names(model, [int(x) for x in args.layers.split(",")], "out")
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
