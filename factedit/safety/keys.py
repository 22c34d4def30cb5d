"""Keys: the inputs of the edited matrices, and their second moment over a reference corpus.

For a matrix W applied as y = W k, the inputs k it sees on ordinary text are the keys an edit ΔW must
leave alone (ΔW k ≈ 0; AlphaEdit, Fang et al. 2025). `key_statistics` computes, per module, the mean
outer product C = E[k kᵀ] (in, in) over every non-padding token of a corpus, on the *base* weights.
It is computed once per (base model, corpus, module) and cached as safetensors in
`cache_dir()/keys/<base fingerprint>/<corpus sha256[:16]>/<module>.safetensors`, with its provenance
in the file's metadata (model id and fingerprint, corpus hash, token count, factedit version).

`edit_keys` records the keys one edit's own sequences give (used to protect earlier edits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .._version import __version__
from ..core.cachefiles import read_cached_tensors, write_cached_tensors
from ..core.request import TokenizedRequest, max_context
from ..model.hooks import capture_linear_io, stop_after
from ..model.loading import cache_dir
from ..scoring.sequences import pad_id_of, pad_sequences
from .reference import texts_sha256

LOG = logging.getLogger(__name__)
# /2: each batch's kᵀk is a float32 product (half the time of float64 on a CPU, relative error ~1e-7),
# summed over batches in float64; files of /1 (float64 products) are computed again.
STATS_FORMAT = "factedit.keys/2"


def _last_module(model: nn.Module, modules: Sequence[str]) -> str:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return max(modules, key=order.__getitem__)


@torch.no_grad()
def corpus_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[str],
    texts: Sequence[str],
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 32,
    max_tokens: int = 128,
) -> Iterator[dict[str, torch.Tensor]]:
    """For each batch of `texts`: {module: (n, in) float32} its inputs at the batch's n non-padding tokens.

    `params` replace some of the model's tensors (through `functional_call`, the model is not written),
    e.g. the base values of parameters an Editor has already edited. Texts are cut at `max_tokens`.
    """
    pad_id = pad_id_of(tokenizer)
    limit = min(max_tokens, max_context(model.config) or max_tokens)
    device = next(model.parameters()).device
    on_device = {name: value.to(device) for name, value in params.items()} if params else None
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t).input_ids[:limit] for t in texts[start : start + batch_size]]
        ids, mask = pad_sequences([e for e in encoded if e], pad_id)
        inputs = module_inputs(model, modules, ids, mask, on_device)  # module -> (B, T, in)
        keep = mask.bool().to(device)  # (B, T)
        yield {name: inputs[name][keep].float() for name in modules}


def compute_key_statistics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[str],
    texts: Sequence[str],
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 32,
    max_tokens: int = 128,
) -> tuple[dict[str, torch.Tensor], int]:
    """({module: E[k kᵀ] (in, in) float64}, tokens) over every non-padding token of `texts` (`corpus_keys`)."""
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for keys in corpus_keys(model, tokenizer, modules, texts, params=params, batch_size=batch_size,
                            max_tokens=max_tokens):
        for name, k in keys.items():  # k: (n, in)
            moment = (k.T @ k).double()  # (in, in)
            sums[name] = sums[name] + moment if name in sums else moment
        tokens += next(iter(keys.values())).shape[0] if keys else 0
    return {name: (s / max(tokens, 1)).cpu() for name, s in sums.items()}, tokens


def _expected(corpus_sha: str) -> dict[str, str]:
    """The metadata a cache file must carry to be used for the corpus `corpus_sha`."""
    return {"format": STATS_FORMAT, "corpus_sha256": corpus_sha}


def _stats_path(fingerprint: str, corpus_sha: str, module: str) -> Path:
    return cache_dir() / "keys" / fingerprint / corpus_sha[:16] / f"{module}.safetensors"


def key_statistics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[str],
    texts: Sequence[str],
    *,
    fingerprint: str,
    model_id: str,
    params: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """E[k kᵀ] per module over `texts` on the base weights, from the cache or computed and cached.

    `fingerprint`/`model_id` name the base model (an Editor passes its base fingerprint, taken before
    any edit); `params` hold base values for parameters already edited (see compute_key_statistics).
    """
    corpus_sha = texts_sha256(list(texts))
    out: dict[str, torch.Tensor] = {}
    missing = []
    for module in modules:
        cached = read_cached_tensors(_stats_path(fingerprint, corpus_sha, module), _expected(corpus_sha))
        if cached is not None and "second_moment" in cached:
            out[module] = cached["second_moment"]
        else:
            missing.append(module)
    if missing:
        LOG.info("computing key statistics of %d module(s) over %d texts (once per model)", len(missing), len(texts))
        computed, tokens = compute_key_statistics(model, tokenizer, missing, texts, params=params)
        for module, moment in computed.items():
            meta = {"format": STATS_FORMAT, "module": module, "model_id": model_id, "model_fingerprint": fingerprint,
                    "corpus_sha256": corpus_sha, "tokens": str(tokens), "factedit_version": __version__}
            write_cached_tensors(_stats_path(fingerprint, corpus_sha, module), {"second_moment": moment}, meta)
            out[module] = moment
    return out


def cached_derivative(
    fingerprint: str, corpus: Sequence[str], module: str, tag: str, compute: Callable[[], dict[str, torch.Tensor]],
    required: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Tensors derived from a module's statistics (e.g. a null-space basis for one threshold), cached
    beside them as `<module>.<tag>.safetensors`; `compute()` makes them when the file is missing or
    lacks one of the `required` tensors (a file of an older version: it is written again)."""
    corpus_sha = texts_sha256(list(corpus))
    path = _stats_path(fingerprint, corpus_sha, module).with_name(f"{module}.{tag}.safetensors")
    cached = read_cached_tensors(path, _expected(corpus_sha))
    if cached is not None and set(required) <= set(cached):
        return cached
    tensors = compute()
    meta = {"format": STATS_FORMAT, "module": module, "derived": tag, "model_fingerprint": fingerprint,
            "corpus_sha256": corpus_sha, "factedit_version": __version__}
    write_cached_tensors(path, tensors, meta)
    return tensors


@torch.no_grad()
def edit_keys(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, modules: Sequence[str],
    requests: Sequence[TokenizedRequest], params: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """{module: (N, in)}: the inputs of `modules` at every token of the requests' prompt + target; with
    `params` swapped in for the model's own (functional_call; e.g. an edit previewed, not applied)."""
    ids, mask = pad_sequences([r.input_ids for r in requests], pad_id_of(tokenizer))
    inputs = module_inputs(model, modules, ids, mask, params)
    keep = mask.bool().to(next(model.parameters()).device)
    return {name: inputs[name][keep].cpu() for name in modules}


def anchor_keys(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, modules: Sequence[str],
    requests: Sequence[TokenizedRequest],
) -> dict[str, torch.Tensor]:
    """{module: (N, in)}: the inputs of `modules` at each request's `anchor` (the subject's last token
    of an edit keyed on its subject); every request must carry one."""
    if any(r.anchor is None for r in requests):
        raise ValueError("anchor_keys needs requests that carry their anchor (scoring.batches.prefixed_requests)")
    ids, mask = pad_sequences([r.input_ids for r in requests], pad_id_of(tokenizer))
    inputs = module_inputs(model, modules, ids, mask)
    rows = torch.arange(len(requests))
    anchors = torch.tensor([r.anchor for r in requests])
    return {name: inputs[name][rows, anchors].cpu() for name in modules}  # (N, in)


@torch.no_grad()
def module_inputs(
    model: nn.Module, modules: Sequence[str], ids: torch.Tensor, mask: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """{module: (B, T, in)}: the inputs of `modules` on one padded batch, ids and mask (B, T); the pass
    stops after the last of them. `params` as `edit_keys` takes them."""
    device = next(model.parameters()).device
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    with capture_linear_io(model, modules, grads=False) as io, stop_after(model, _last_module(model, modules)):
        if params:
            torch.func.functional_call(model, dict(params), args=(), kwargs=kwargs, strict=False)
        else:
            model(**kwargs)
    return {name: io.inputs[name].detach() for name in modules}
