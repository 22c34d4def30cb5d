"""Benchmark of edits as standard artifacts (issue 13) on the default model: 20 accumulated `mend` edits
exported as a PEFT LoRA adapter and as a merged HuggingFace folder, then loaded back.

    .venv/bin/python bench/bench_export.py                     # CounterFact val[0:20], unrelated val[100:150]
    .venv/bin/python bench/bench_export.py --n 20 --unrelated 50 --out /tmp/export

Figures (fp32, CPU), on the edit prompts and on unrelated prompts (the next token after each prompt):
- PeftModel.from_pretrained(base, adapter) against the edited model: greedy agreement and max |Δ logit|;
- merge_and_unload() against the edited weights: max |Δ weight|;
- the merged folder reloaded with AutoModelForCausalLM.from_pretrained: torch.equal to the edited weights;
- the adapter imported on a fresh base: max |Δ weight| while active, torch.equal to the base once reverted;
- check_vllm_compatible on the adapter; the adapter's rank and size; export times.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from records import counterfact_split
from transformers import AutoModelForCausalLM

import factedit


def next_token_logits(model: torch.nn.Module, tok, prompts: list[str]) -> torch.Tensor:
    """(prompts, vocab): the logits after each prompt's last token, one prompt at a time (no padding)."""
    with torch.no_grad():
        return torch.cat([model(**tok(p, return_tensors="pt")).logits[:, -1].float() for p in prompts])


def max_weight_diff(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(float((params[n].detach() - value).abs().max()) for n, value in reference.items())


def agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.argmax(-1) == b.argmax(-1)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=0, help="first CounterFact val record to edit")
    parser.add_argument("--n", type=int, default=20, help="mend edits, one after another")
    parser.add_argument("--unrelated", type=int, default=50, help="unrelated prompts (val records from 100)")
    parser.add_argument("--out", default=None, help="folder for the exports (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-export-"))
    val = counterfact_split("val")
    cases = val[args.start:args.start + args.n]
    unrelated = [c["prompt"] for c in val[100:100 + args.unrelated]]
    edit_prompts = [c["prompt"] for c in cases]

    model, tok = factedit.load_model()
    editor = factedit.Editor("mend", tokenizer=tok, guard=None)
    t = time.perf_counter()
    for case in cases:
        editor.edit(model, case["prompt"], case["target_new"])
    edit_s = time.perf_counter() - t
    touched = {n for r in editor.history for n in r.params}
    edited = {n: p.detach().clone() for n, p in model.named_parameters() if n in touched}
    edited_logits = {"edit": next_token_logits(model, tok, edit_prompts),
                     "unrelated": next_token_logits(model, tok, unrelated)}
    t = time.perf_counter()
    result = editor.export_adapter(out / "adapter")
    adapter_s = time.perf_counter() - t
    t = time.perf_counter()
    merged = editor.export_merged(model, out / "merged")
    merged_s = time.perf_counter() - t
    editor.revert_all(model)
    editor.close()
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    merged_equal = all(torch.equal(p, edited[n]) for n, p in reloaded.named_parameters() if n in edited)
    del reloaded

    fresh, _ = factedit.load_model()
    with factedit.Editor("mend", tokenizer=tok, guard=None) as importer:
        record = importer.import_adapter(fresh, result.path)
        import_diff = max_weight_diff(dict(fresh.named_parameters()), edited)
        importer.revert(fresh, record.id)
        import_reverts_exactly = importer.weights_are_base(fresh)

    peft_model = PeftModel.from_pretrained(fresh, str(result.path))
    peft_logits = {"edit": next_token_logits(peft_model, tok, edit_prompts),
                   "unrelated": next_token_logits(peft_model, tok, unrelated)}
    merge_diff = max_weight_diff(dict(peft_model.merge_and_unload().named_parameters()), edited)

    size = (result.path / "adapter_model.safetensors").stat().st_size
    span = f"CounterFact val[{args.start}:{args.start + args.n}]"
    print(f"default model, {args.n} mend edits ({span}) in {edit_s:.1f} s; {len(result.modules)} modules, "
          f"LoRA rank {result.rank}, adapter {size / 2**20:.1f} MiB")
    print(f"export: adapter {adapter_s:.2f} s, merged folder {merged_s:.2f} s; vLLM check: "
          f"{check_vllm_compatible_summary(result.path)}")
    for kind, prompts in (("edit", edit_prompts), ("unrelated", unrelated)):
        diff = float((peft_logits[kind] - edited_logits[kind]).abs().max())
        print(f"PeftModel vs edited model, {kind} prompts: greedy next token agrees on "
              f"{agreement(peft_logits[kind], edited_logits[kind])}/{len(prompts)}, max |Δ logit| {diff:.2e}")
    print(f"merge_and_unload vs edited weights: max |Δ weight| {merge_diff:.2e}")
    print(f"merged folder reloaded: torch.equal to the edited weights: {merged_equal}")
    print(f"adapter imported on a fresh base: max |Δ weight| {import_diff:.2e}; reverted, torch.equal to the base: "
          f"{import_reverts_exactly}")
    print(f"exports in {out}")


def check_vllm_compatible_summary(path: Path) -> str:
    problems = factedit.check_vllm_compatible(path)
    return "passes" if not problems else "; ".join(problems)


if __name__ == "__main__":
    main()
