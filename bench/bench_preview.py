"""Benchmark of the app's edit flow, without the browser: preview, then apply after the confirm.

For each method, on the default model as the app runs it (one torch thread, the drift guard at the app's
bound and prepared first, the app's probes plus the automatic neighbours it adds): for each CounterFact
val record [start, start + n), `Editor.preview` of the fact (its rephrase as a paraphrase, its locality
prompt), then `Editor.apply_preview`, then revert (checked bit for bit). `--repeats` passes over the
records. Prints, per method, the medians of: the preview call (of it the method's compute and the
scoring), apply after the confirm (`apply_preview`; of it the guard), and the guard's share of a whole
`edit` call of the same fact (the one-click path, apply without preview).

    python bench/bench_preview.py                              # ft_l and mend, val[:10], 3 passes
    python bench/bench_preview.py --methods mend --n 5 --repeats 1 --profile runs/preview.prof
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from records import counterfact_split

import factedit

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "apps"))
from editapp.neighbours import neighbours  # noqa: E402  (apps/ is not a package on the path)

PROBES = ["The capital of France is", "The capital of Germany is", "The capital of Italy is",
          "The Eiffel Tower is located in", "The official language of Spain is"]  # factedit/conf/app.yaml


def request_of(record: dict) -> factedit.EditRequest:
    return factedit.EditRequest(record["prompt"], record["target_new"], paraphrases=(record["rephrase_prompt"],),
                                locality=(record["locality_prompt"],))


def probes_for(request: factedit.EditRequest) -> list[str]:
    """The app's probes and the neighbours it derives from them (apps/editapp/actions.py)."""
    extra = neighbours(request.prompt, PROBES, [*PROBES, *request.paraphrases, *request.locality])
    return [*PROBES, *extra]


def ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def run_method(method: str, model, tok, records: list[dict], repeats: int, profile: cProfile.Profile | None) -> dict:
    editor = factedit.Editor(method, tokenizer=tok, guard=1.5)
    editor.warm_guard(model)
    rows: dict[str, list[float]] = {k: [] for k in ("preview", "compute", "score", "apply", "apply_guard",
                                                    "edit", "edit_guard")}
    refused = exact = 0
    for _ in range(repeats):
        for record in records:
            request = request_of(record)
            if profile is not None:
                profile.enable()
            t = time.perf_counter()
            preview = editor.preview(model, [request], probes=probes_for(request))
            rows["preview"].append(ms(t))
            rows["compute"].append(preview.timings["compute_ms"])
            rows["score"].append(preview.timings["score_ms"])
            t = time.perf_counter()
            try:
                edit = editor.apply_preview(model, preview)
            except factedit.DriftError:
                refused += 1
                continue
            finally:
                if profile is not None:
                    profile.disable()
            rows["apply"].append(ms(t))
            rows["apply_guard"].append(edit.timings.get("guard_ms", 0.0))
            editor.revert(model, edit.id)
            exact += editor.weights_are_base(model)
            edit = editor.edit(model, request.prompt, request.target, paraphrases=request.paraphrases,
                               locality=request.locality)  # the one-click path, for the guard's share
            rows["edit"].append(edit.timings["edit_ms"])
            rows["edit_guard"].append(edit.timings.get("guard_ms", 0.0))
            editor.revert(model, edit.id)
    editor.close()
    med = {k: statistics.median(v) if v else float("nan") for k, v in rows.items()}
    return {"method": method, **{f"{k}_ms": round(v, 1) for k, v in med.items()},
            "guard_share_edit": round(med["edit_guard"] / med["edit"], 3),
            "guard_share_apply": round(med["apply_guard"] / med["apply"], 3),
            "refused": refused, "exact": f"{exact}/{len(rows['apply'])}", "runs": len(rows["preview"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="ft_l,mend")
    parser.add_argument("--start", type=int, default=0, help="first CounterFact val record")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the records")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the app runs on 1)")
    parser.add_argument("--profile", default=None, help="write a cProfile of the preview/apply calls here")
    parser.add_argument("--out", default="runs/bench-preview.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = factedit.load_model()
    records = counterfact_split("val")[args.start : args.start + args.n]
    profile = cProfile.Profile() if args.profile else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for method in args.methods.split(","):
        row = run_method(method, model, tok, records, args.repeats, profile)
        row["load_avg"] = round(os.getloadavg()[0], 2)
        print(json.dumps(row))
        with out.open("a") as f:
            f.write(json.dumps({**row, "start": args.start, "n": args.n, "threads": args.threads}) + "\n")
    if profile is not None:
        profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
