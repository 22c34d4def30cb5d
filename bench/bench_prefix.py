"""Prefix tuning as a fact editor (factedit/modules/prefix.py): one PEFT prefix adapter trained per
CounterFact record, loaded with PeftModel.from_pretrained, measured with bench_editing.py's protocol
(ES/PS/NS, what the model says), then dropped. Prints one table row and the unedited one.

    python bench/bench_prefix.py --split train --n 10 --threads 1 [--set num_virtual_tokens=16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_editing import counterfact_outcome, said_case, share
from records import counterfact_split

import factedit
from factedit.core.request import EditRequest
from factedit.modules.prefix import PrefixConfig, train_prefix_adapter
from factedit.scoring.said import said_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a PrefixConfig field")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = PrefixConfig(**{k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)})
    records = counterfact_split(args.split)[
        args.start : args.start + args.n]
    model, tok = factedit.load_model()
    before = said_scores(model, tok, [said_case(r) for r in records])
    unedited = [counterfact_outcome(model, tok, r, b) for r, b in zip(records, before, strict=True)]
    from peft import PeftModel

    outcomes, times = [], []
    for record, said in zip(records, before, strict=True):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            result = train_prefix_adapter(model, tok, [EditRequest(record["prompt"], record["target_new"])],
                                          Path(tmp) / "prefix", config)
            times.append((time.perf_counter() - t) * 1000)
            loaded = PeftModel.from_pretrained(model, str(result.path)).eval()
            outcomes.append(counterfact_outcome(loaded, tok, record, said))
            model = loaded.get_base_model()  # the base model again: a prefix adds nothing to it
        print(json.dumps({**outcomes[-1], "steps": result.steps, "nll": round(result.nll, 3)}), flush=True)
    keys = ("es", "said", "chat", "ps", "said_para", "chat_para", "ns", "nbr_kept")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\nCounterFact {args.split}[{args.start}:{args.start + args.n}], {config}")
    print("| method | " + " | ".join(keys) + " | median train ms |")
    print(f"| unedited | {' | '.join(fmt(share(unedited, k)) for k in keys)} | |")
    print(f"| prefix (PEFT) | {' | '.join(fmt(share(outcomes, k)) for k in keys)} | {statistics.median(times):.0f} |")


if __name__ == "__main__":
    main()
