"""Generation speed with many kept edits against the unedited model (issue 22: 1,000 `grace` edits).

Takes the edits of a journal (e.g. the one a sequential `factedit eval` run leaves in its output
folder; there every edit is reverted at the end, so they are re-applied here from their stored deltas,
in order, through `Editor.export_edit` / `import_edit`), then times greedy generation
(`model.generate`, the edits' side modules as forward hooks) on CounterFact prompts with all of them
active and on a second, unedited copy of the model, alternating rounds so that load on a shared
machine hits both alike, and reports the median tokens per second of each and their ratio. At the end
every edit is reverted and the model checked against the base (weights bit for bit, no hook left).

    python bench/bench_generation_speed.py --journal runs/acc-grace-1000/sequential/journal-grace.sqlite
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from records import counterfact_split

import factedit


def reapply(journal: Path, model, tok, limit: int | None) -> factedit.Editor:
    """An in-memory Editor holding the journal's edits (all of them, reverted or not), applied in order."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "source.sqlite"
        shutil.copy(journal, copy)
        source = factedit.Editor("grace", tokenizer=tok, journal=copy, score=False)
        records = sorted(source.history, key=lambda r: r.created_at)[:limit]
        editor = factedit.Editor(records[0].method, tokenizer=tok, score=False, guard=None)
        for i, record in enumerate(records):
            path = source.export_edit(record.id, Path(tmp) / f"{i}.safetensors")
            editor.import_edit(model, path)
        source.close()
    return editor


def tokens_per_second(model, batch, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out.shape[0] * new_tokens / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--journal", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=None, help="re-apply only the first N edits")
    parser.add_argument("--prompts", type=int, default=8, help="CounterFact val prompts generated from, in one batch")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = factedit.load_model()
    tok.padding_side = "left"
    records = counterfact_split("val")[: args.prompts]
    batch = tok([r["prompt"] for r in records], return_tensors="pt", padding=True)

    unedited, _ = factedit.load_model()
    tokens_per_second(unedited, batch, args.tokens)  # warm-up
    start = time.perf_counter()
    editor = reapply(args.journal, model, tok, args.limit)
    apply_s = time.perf_counter() - start
    active = [r for r in editor.history if r.status == "active"]
    entries = sum(m.tensors["keys"].shape[0] for r in active for m in editor.delta(r.id).modules.values()
                  if m.type == "codebook")
    edited_tps, unedited_tps = [], []
    for _ in range(args.rounds):
        edited_tps.append(tokens_per_second(model, batch, args.tokens)[0])
        unedited_tps.append(tokens_per_second(unedited, batch, args.tokens)[0])
    editor.revert_all(model)
    exact = editor.weights_are_base(model) and not any(m._forward_hooks for m in model.modules())
    result = {
        "edits": len(active), "codebook_entries": entries, "prompts": args.prompts, "tokens": args.tokens,
        "threads": args.threads, "unedited_tok_s": statistics.median(unedited_tps),
        "edited_tok_s": statistics.median(edited_tps), "reapply_s": apply_s, "revert_exact": exact,
    }
    result["slowdown"] = result["unedited_tok_s"] / result["edited_tok_s"]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
