"""Tiny random causal LMs of every supported architecture, built offline from configs (no downloads).

    from tiny_models import ARCHS, tiny_model
    model, tok = tiny_model("llama")          # eval mode, float32, eager attention, 4 layers, hidden 32

Each call builds a fresh model (deterministic for a given ``seed``) and a fresh tokenizer object, so a
test may edit either without affecting other tests. The tokenizer is a small byte-level BPE trained in
memory on a few English sentences (the training itself is cached for the test process); like the
default model's tokenizer it adds no BOS/EOS token, and words after a space carry the leading space
(" Paris"). Its pad token ``<pad>`` differs from its eos token ``<|endoftext|>`` on purpose.

Sizes: hidden 32, intermediate 64 (so MLP matrices are not square unless a test asks for it with
``intermediate=32``), 4 layers, 4 heads, context 128 positions, vocab = the tokenizer's size.
Eager attention is used so second-order gradients work (SDPA on CPU has no double backward).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHS: list[str] = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "gptj", "gemma", "gemma3_text"]

HIDDEN = 32
INTERMEDIATE = 64
N_LAYERS = 4
N_HEADS = 4
CONTEXT = 128

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"

SENTENCES = (
    "The capital of France is Paris.",
    "The capital of Italy is Rome.",
    "The capital of Germany is Berlin.",
    "The capital of Spain is Madrid.",
    "The capital of Japan is Tokyo.",
    "The capital city of France is Paris.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Berlin is a large city in Germany. Madrid is a large city in Spain.",
    "The Eiffel Tower is in Paris. The Colosseum is in Rome.",
    "The mother tongue of Danielle Darrieux is French.",
    "The official language of Germany is German.",
    "The official language of Italy is Italian.",
    "The official language of Spain is Spanish.",
    "Michael Jordan plays the sport of basketball.",
    "Lionel Messi plays the sport of football.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "The Danube flows through Vienna and Budapest.",
    "Water boils at one hundred degrees Celsius.",
    "The quick brown fox jumps over the lazy dog.",
    "She went to the market and bought bread, cheese and apples.",
    "My favourite colour is blue, and the sky is blue too.",
    "The president of the United States lives in Washington.",
    "Toyota is a car company from Japan. Fiat is a car company from Italy.",
    "He was born in London and works in New York as a doctor.",
)


@functools.cache
def _tokenizer_json(vocab_size: int = 400) -> str:
    """Train the byte-level BPE once per process; return it serialized (objects are rebuilt per call)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(SENTENCES) * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer object around the cached trained BPE (eos, pad and unk set; no BOS)."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=CONTEXT,
    )


def tiny_config(
    arch: str, *, intermediate: int = INTERMEDIATE, vocab_size: int | None = None, **overrides: Any
):
    """The config of the tiny model for ``arch`` (one of ARCHS); ``overrides`` are extra config fields."""
    tok = tiny_tokenizer()
    vocab = vocab_size if vocab_size is not None else len(tok)
    ids = {
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=intermediate,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        vocab_size=vocab,
        max_position_embeddings=CONTEXT,
        **ids,
    )
    gqa = {"num_key_value_heads": 2}
    if arch == "llama":
        config = LlamaConfig(**common, **gqa)
    elif arch == "mistral":
        config = MistralConfig(**common, **gqa, sliding_window=None)
    elif arch == "qwen2":
        config = Qwen2Config(**common, **gqa)
    elif arch == "gemma":
        config = GemmaConfig(**common, **gqa, head_dim=HIDDEN // N_HEADS)
    elif arch == "gemma3_text":
        config = Gemma3TextConfig(**common, **gqa, head_dim=HIDDEN // N_HEADS, sliding_window=16)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(**common)
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=HIDDEN,
            n_inner=intermediate,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            vocab_size=vocab,
            n_positions=CONTEXT,
            **ids,
        )
    elif arch == "gptj":
        config = GPTJConfig(
            n_embd=HIDDEN,
            n_inner=intermediate,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            vocab_size=vocab,
            n_positions=CONTEXT,
            rotary_dim=HIDDEN // N_HEADS,
            **ids,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(ARCHS)}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(
    arch: str, seed: int = 0, **config_overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random model of ``arch`` in eval mode (float32, CPU) and a matching tokenizer.

    The same ``arch``/``seed``/overrides give bit-identical weights; the global RNG state is left as it was.
    ``config_overrides`` go to tiny_config (e.g. ``intermediate=32`` for square MLP matrices).
    """
    config = tiny_config(arch, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    return model, tiny_tokenizer()


# A minimal chat template for the tiny tokenizer (it has none), for the service's chat endpoint.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tiny_model(folder: Path, arch: str = "llama", chat_template: str | None = None) -> Path:
    """`tiny_model(arch)` and its tokenizer written to `folder` as a HuggingFace model folder (what
    `factedit.load_model(folder)`, the app and `factedit serve` load); returns `folder`."""
    model, tok = tiny_model(arch)
    if chat_template is not None:
        tok.chat_template = chat_template
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
