"""The main job (`make demo`): keep several facts at once in the default model, check them, revert exactly.

Loads the embedded SmolLM2-135M and edits four facts one after another with the lifelong editor that
keeps edits best there, `mend` (its trained editor network keyed on each fact's subject, lifelong
statistics, small steps from fresh gradients until the target leads by a margin; `ultraedit`, which
needs no trained network, on a model `mend`'s editor was not trained for; docs/lifelong.md, "Lifelong
editing"), with the drift guard on, keeping all of them.
It then shows that each new fact holds (with a paraphrase, and what the model replies when asked it
as a chat), that unrelated facts keep their answers, and how far plain text drifted (perplexity of
the reference text over the base model's). It reverts one edit (the others stay), then the rest, and
checks every parameter against the original bit for bit. `--method ultraedit` runs the same without
a trained network, `--method ft_l` with constrained fine-tuning; `--config` passes the method's
settings (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from . import display
from .core.methods import available_methods, default_method_for
from .core.request import encode_prompt
from .editing.editor import Editor
from .model.chat import chat_ids, has_chat_template, user_message
from .model.loading import load_model
from .safety.drift import GuardConfig, reference_perplexity
from .safety.reference import reference_texts
from .scoring.said import eos_ids_of, generate_ids
from .scoring.sequences import pad_id_of, score_sequences, top_tokens

# (prompt, new target, paraphrase)
FACTS = [
    ("The capital of France is", "Rome", "The capital city of France is"),
    ("The Eiffel Tower is located in the city of", "London", "The Eiffel Tower stands in the city of"),
    ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux's native language is"),
    ("Water freezes at a temperature of zero degrees", "Fahrenheit", "Water turns to ice at zero degrees"),
]
UNRELATED = [
    "The capital of Germany is",
    "The capital of Italy is",
    "The Colosseum is located in the city of",
    "The mother tongue of Vladimir Putin is",
]
# The facts asked as a chat (one user message through the chat template), and one unrelated question.
CHAT = [
    ("What is the capital of France?", "Rome"),
    ("In which city is the Eiffel Tower?", "London"),
    ("What is the mother tongue of Danielle Darrieux?", "English"),
    ("What is the capital of Germany?", "unchanged"),
]
CHAT_TOKENS = 16


def top1(model, tokenizer, prompts: list[str]) -> list[str]:
    pairs = [(encode_prompt(tokenizer, p), ()) for p in prompts]
    scores = score_sequences(model, pairs, pad_id_of(tokenizer))
    return [display.format_top(top_tokens(tokenizer, s.next_logprobs, 1), 1) for s in scores]


def show(model, tokenizer, title: str, rows: list[tuple[str, str]], base_ppl: float) -> None:
    prompts = [p for p, _ in rows]
    print(f"\n{title}")
    table = [(repr(p), want, got) for (p, want), got in zip(rows, top1(model, tokenizer, prompts), strict=True)]
    print(display.format_table(table, ["prompt", "wanted", "top next token"]))
    ppl = reference_perplexity(model, tokenizer, reference_texts("samples"))
    print(f"plain text: perplexity {ppl:.3f}, {ppl / base_ppl:.4f}× the unedited model's")


def show_chat(model, tokenizer, title: str) -> None:
    """The greedy reply to each CHAT question (nothing for a tokenizer without a chat template)."""
    if not has_chat_template(tokenizer):
        return
    prompts = [chat_ids(tokenizer, user_message(question)) for question, _ in CHAT]
    replies = generate_ids(model, prompts, CHAT_TOKENS, pad_id_of(tokenizer), eos_ids_of(model, tokenizer))
    table = [(repr(q), want, tokenizer.decode(r, skip_special_tokens=True).strip())
             for (q, want), r in zip(CHAT, replies, strict=True)]
    print(f"\n{title}, asked as a chat")
    print(display.format_table(table, ["question", "wanted", f"reply ({CHAT_TOKENS} tokens at most)"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default=None,
                        help="default: mend on a model its trained editor fits (the embedded one), else ultraedit")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: embedded model)")
    parser.add_argument("--config", default="{}", type=json.loads,
                        help="method settings as JSON, e.g. '{\"positions\": \"all\", \"finish_steps\": 0, "
                             "\"take_margin\": 0}' (mend's defaults before 2026-12-05)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
          f"in {time.perf_counter() - t:.1f} s")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_ppl = reference_perplexity(model, tokenizer, reference_texts("samples"))
    checks = [(p, f"{t!r}") for p, t, _ in FACTS] + [(q, f"{t!r}") for _, t, q in FACTS]
    unrelated = [(p, "unchanged") for p in UNRELATED]
    show(model, tokenizer, "Before any edit", checks + unrelated, base_ppl)
    show_chat(model, tokenizer, "Before any edit")

    args.method = args.method or default_method_for(model, available_methods())
    editor = Editor(args.method, tokenizer=tokenizer, guard=GuardConfig(), **args.config)
    records = []
    print(f"\nEditing {len(FACTS)} facts one after another with {args.method} (guard: {editor.guard})")
    for prompt, target, _ in FACTS:
        record = editor.edit(model, prompt, target)
        records.append(record)
        drift = f", drift {record.drift:.4f}×" if record.drift is not None else ""
        print(f"  {record.id}: {prompt!r} -> {target!r}  {record.timings['edit_ms']:.0f} ms{drift}")
    show(model, tokenizer, f"With all {len(records)} edits active", checks + unrelated, base_ppl)
    show_chat(model, tokenizer, f"With all {len(records)} edits active")

    t = time.perf_counter()
    editor.revert(model, records[0].id)
    print(f"\nReverted {records[0].id} ({FACTS[0][0]!r}) in {(time.perf_counter() - t) * 1000:.0f} ms; "
          "the other edits stay")
    show(model, tokenizer, "After reverting the first edit", [(FACTS[0][0], "original"), *checks[1:len(FACTS)]],
         base_ppl)

    editor.revert_all(model)
    exact = all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    print(f"\nReverted the rest. Every parameter equals the original bit for bit: {'yes' if exact else 'NO'} "
          f"({len(original)} parameters)")
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
