"""Peak resident memory and time of one `edit_batch` of N CounterFact facts on the default model.

    python bench/bench_batch_memory.py --method alphaedit --n 40 --start 400 --threads 2

Run one batch size per process: the peak (ru_maxrss) is the process's own since it started.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from records import counterfact_split

import factedit


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="alphaedit")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--start", type=int, default=400)
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", default="{}", help="JSON of method config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = counterfact_split(args.split)
    records = records[args.start : args.start + args.n]
    model, tok = factedit.load_model()
    editor = factedit.Editor(args.method, tokenizer=tok, score=False, **json.loads(args.config))
    loaded = peak_gb()
    requests = [factedit.EditRequest(r["prompt"], r["target_new"], r.get("subject")) for r in records]
    start = time.perf_counter()
    editor.edit_batch(model, requests)
    seconds = time.perf_counter() - start
    print(json.dumps({"method": args.method, "facts": args.n, "peak_gb": round(peak_gb(), 2),
                      "peak_gb_after_load": round(loaded, 2), "seconds": round(seconds, 1),
                      "seconds_per_fact": round(seconds / args.n, 2), "threads": args.threads}))


if __name__ == "__main__":
    main()
