"""Whether a model's MLP matrices have a null space to edit in: the spectrum of E[k kᵀ] over the
reference corpus (the statistics AlphaEdit's projection and every preserver read), per block.

    python bench/bench_key_spectrum.py                              # default model, down projections
    python bench/bench_key_spectrum.py --layers 3,4,5,6,7 --role in --thresholds 0.1,0.5
    python bench/bench_key_spectrum.py --model Qwen/Qwen2.5-0.5B --layers 4-8

For each matrix: the largest eigenvalue's share of the key energy (a "massive activation" direction
makes the mean eigenvalue, and so a threshold × the mean, mostly its own), then, at each threshold,
how many directions lie under threshold × the mean eigenvalue and the share of the corpus keys'
energy they carry (what an update confined to them still moves on the corpus), and the smallest
eigenvalue over the mean of the rest (the two largest left out). A preserver's null space is those
directions (`PreserveConfig.threshold`); a real one carries almost no energy. The statistics come
from the cache, or are computed once (a forward pass over the corpus).

`--subject-keys SPLIT:START:N` (down projections only) adds, over N CounterFact records, the median of
s = kᵀ(w C)⁻¹k for the key an edit writes at (the subject's last token, averaged over the context
prefixes, as `alphaedit` reads it), w = `--cov-weight` (default: the key width, as the editors weigh):
MEMIT's covariance solve delivers s / (1 + s) of a value at such a key, and its leak into the corpus
keys' outputs per unit of value delivered falls as s grows, so a block whose subject keys have a larger s
is a cheaper place to write a fact.
"""

from __future__ import annotations

import argparse

import torch
from records import counterfact_split

import factedit
from factedit.core.request import EditRequest, tokenize_request
from factedit.locate.config import LocateConfig
from factedit.locate.method import Locate
from factedit.model.loading import model_id
from factedit.model.specs import layer_index, mlp_param_names, module_of, num_layers
from factedit.model.weights import model_fingerprint
from factedit.safety.keys import key_statistics
from factedit.safety.preserve import covariance_weight
from factedit.safety.reference import key_corpus


def layer_list(text: str | None, count: int) -> list[int]:
    """"3,4,7" or "4-8" (inclusive); None: every block."""
    if not text:
        return list(range(count))
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        out += list(range(int(first), int(last) + 1)) if last else [int(first)]
    return out


def spectrum_row(moment: torch.Tensor, thresholds: list[float]) -> dict[str, float]:
    """The figures of one matrix (module docstring) from its E[k kᵀ] (in, in)."""
    eigenvalues = torch.linalg.eigvalsh(moment.double()).clamp(min=0)  # ascending, (in,)
    total, mean = float(eigenvalues.sum()), float(eigenvalues.mean())
    row = {"top share": float(eigenvalues[-1]) / total}
    for t in thresholds:
        under = eigenvalues < t * mean
        row[f"dims < {t}"] = int(under.sum())
        row[f"energy < {t}"] = float(eigenvalues[under].sum()) / total
    rest = eigenvalues[:-2]
    row["min / rest mean"] = float(rest[0] / rest.mean())
    return row


def subject_keys(model, tok, names: list[str], records: str) -> dict[str, torch.Tensor]:
    """{name: (N, in)}: the keys an edit of each of the CounterFact `records` ("SPLIT:START:N") writes at
    in the down projections `names` (the subject's last token, averaged over the prefixes, as `alphaedit`
    reads them), on the model as it is."""
    split, start, count = records.split(":")
    data = counterfact_split(split)
    data = data[int(start) : int(start) + int(count)]
    requests = [tokenize_request(EditRequest(r["prompt"], r["target_new"], subject=r["subject"]), tok, None)
                for r in data]
    layers = tuple(layer_index(model, n) for n in names)
    return Locate(LocateConfig(layers=layers)).edit_keys(model, tok, names, requests)


def subject_key_norms(model, tok, names: list[str], moments: dict[str, torch.Tensor], records: str,
                      cov_weight: float | None) -> dict[str, float]:
    """{name: median s = kᵀ(w C)⁻¹k} over the subject keys of CounterFact `records` ("SPLIT:START:N")."""
    keys = subject_keys(model, tok, names, records)  # {name: (N, in)}
    out = {}
    for name in names:
        moment = moments[module_of(name)].double()  # (in, in)
        moment = moment * covariance_weight(cov_weight, moment.shape[0])
        k = keys[name].double()
        s = (k * torch.linalg.solve(moment, k.T).T).sum(dim=1)  # (N,)
        out[name] = float(s.median())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded model)")
    parser.add_argument("--layers", default=None, help='blocks, "3,4,7" or "4-8" (default: all)')
    parser.add_argument("--role", default="out", help="MLP matrix role: out (down projection), in, gate")
    parser.add_argument("--thresholds", default="0.1,0.25,0.5", help="× the mean eigenvalue")
    parser.add_argument("--subject-keys", default=None, help="SPLIT:START:N CounterFact records (module docstring)")
    parser.add_argument("--cov-weight", type=float, default=None, help="w of the subject keys' s (default: the width)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    model, tok = factedit.load_model(args.model)
    names = mlp_param_names(model, layer_list(args.layers, num_layers(model)), args.role)
    modules = [module_of(n) for n in names]
    moments = key_statistics(model, tok, modules, key_corpus(), fingerprint=model_fingerprint(model),
                             model_id=model_id(model))
    header = ["top share"] + [f"{k} < {t}" for t in thresholds for k in ("dims", "energy")] + ["min / rest mean"]
    subject = {}
    if args.subject_keys:
        if args.role != "out":
            parser.error("--subject-keys reads the keys of down projections (--role out)")
        subject = subject_key_norms(model, tok, names, moments, args.subject_keys, args.cov_weight)
        header.append("subject key s")
    print("| matrix | " + " | ".join(header) + " |")
    print("|---|" + "---:|" * len(header))
    for module in modules:
        row = spectrum_row(moments[module], thresholds)
        if subject:
            row["subject key s"] = subject[module + ".weight"]
        cells = [f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in header]
        print(f"| {module} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
