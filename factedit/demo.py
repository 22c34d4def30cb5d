"""The main job (`make demo`): edit a fact in the default model, show it, revert it exactly.

Loads the embedded SmolLM2-135M, shows the top predictions for the edit prompt, a paraphrase and an
unrelated prompt, edits "The capital of France is" to " Rome" with constrained fine-tuning (ft_l),
shows them again, reverts, checks every parameter against the original bit for bit, prints timings.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from . import display
from .editing.editor import Editor
from .editing.loading import load_model
from .editing.request import encode_prompt
from .editing.scoring import pad_id_of, score_sequences, top_tokens

PROMPT, TARGET = "The capital of France is", " Rome"
PARAPHRASE = "The capital city of France is"
UNRELATED = "The capital of Germany is"


def show_predictions(model, tokenizer, title: str) -> None:
    prompts = [PROMPT, PARAPHRASE, UNRELATED]
    scores = score_sequences(model, [(encode_prompt(tokenizer, p), ()) for p in prompts], pad_id_of(tokenizer))
    rows = [(repr(p), display.format_top(top_tokens(tokenizer, s.next_logprobs, 3))) for p, s in zip(prompts, scores)]
    print(f"\n{title}")
    print(display.format_table(rows, ["prompt", "top-3 next tokens"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="ft_l")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: embedded model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
          f"in {load_s:.1f} s")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    show_predictions(model, tokenizer, "Before the edit")
    editor = Editor(args.method, tokenizer=tokenizer)
    record = editor.edit(model, PROMPT, TARGET, paraphrases=[PARAPHRASE], locality=[UNRELATED])
    print(f"\nEdit {record.id} with {args.method}: {PROMPT!r} -> {TARGET!r}")
    print(f"  touched {', '.join(record.params)}")
    show_predictions(model, tokenizer, "After the edit")

    t = time.perf_counter()
    editor.revert(model, record.id)
    revert_ms = (time.perf_counter() - t) * 1000
    exact = all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    show_predictions(model, tokenizer, "After the revert")

    timings = record.timings
    print(
        f"\nTimings: model load {load_s * 1000:.0f} ms | edit {timings['edit_ms']:.0f} ms "
        f"(compute {timings['compute_ms']:.0f}, apply {timings['apply_ms']:.1f}, scoring {timings['score_ms']:.0f}) "
        f"| revert {revert_ms:.1f} ms"
    )
    print(f"Revert bit-for-bit exact on all {len(original)} parameters: {'yes' if exact else 'NO'}")
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
