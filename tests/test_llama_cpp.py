"""The real engine: llama.cpp (through llama-cpp-python) runs the default model's GGUF with factedit's GGUF LoRA
adapter, and the merged GGUF, and gives factedit's greedy next tokens; at adapter scale 0 it is the unedited
model. Skipped when llama-cpp-python is not installed; it compiles llama.cpp, and on this machine's CPU only
with `CMAKE_ARGS="-DGGML_NATIVE=OFF"` (`make llama-cpp`; the default build crashes at the first evaluation).
The larger measurement (10 edits, 30 prompts, llama-server) is bench/bench_llama_cpp.py."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
import torch

import factedit
from factedit.artifacts.gguf_export import export_gguf_f32
from factedit.model.loading import default_gguf_path
from factedit.paths import PACKAGE_DIR

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed; build it with `make llama-cpp` "
           "(CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install llama-cpp-python==0.3.36)",
)

# One worker runs this file's tests (make test: --dist loadfile), and the module fixture builds the GGUFs once.
pytestmark = pytest.mark.default_model
RECORDS = slice(900, 903)  # CounterFact val records: edit prompt, paraphrase, neighbour each


def torch_logits(model, ids: list[list[int]]) -> np.ndarray:
    with torch.no_grad():
        return np.stack([model(torch.tensor([i])).logits[0, -1].float().numpy() for i in ids])


def torch_greedy(model, ids: list[list[int]]) -> list[int]:
    return torch_logits(model, ids).argmax(-1).tolist()


def llama_logits(llm, ids: list[list[int]]) -> np.ndarray:
    rows = []
    for i in ids:
        llm.reset()  # no KV cache carried over from another prompt or another adapter scale
        llm.eval(i)
        rows.append(np.array(llm.scores[len(i) - 1], dtype=np.float32))
    return np.stack(rows)


def set_scale(llm, scale: float) -> None:
    """The adapter's scale on the loaded context (llama_set_adapters_lora: what llama-server calls for a
    request's `lora` field; llama-cpp-python 0.3.36 exposes no per-request scale of its own)."""
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
    assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(scale)) == 0
    llm.reset()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Three `mend` edits (low-rank: the adapter is exact) on the default model, exported both ways; factedit's
    greedy next tokens before and after on the 9 prompts."""
    out = tmp_path_factory.mktemp("llama-cpp")
    records = json.loads((PACKAGE_DIR / "data/counterfact/val.json").read_text())[RECORDS]
    prompts = ([r["prompt"] for r in records] + [r["rephrase_prompt"] for r in records]
               + [r["locality_prompt"] for r in records])
    model, tok = factedit.load_model()
    ids = [tok(p).input_ids for p in prompts]
    unedited_logits = torch_logits(model, ids)
    with factedit.Editor("mend", tokenizer=tok, guard=None) as editor:
        for r in records:
            editor.edit(model, r["prompt"], r["target_new"])
        edited_logits = torch_logits(model, ids)
        adapter = editor.export_adapter(out / "edits.gguf", format="gguf")
        merged = editor.export_merged(model, out / "merged.gguf", format="gguf")
        editor.revert_all(model)
    unedited, edited = unedited_logits.argmax(-1).tolist(), edited_logits.argmax(-1).tolist()
    assert edited != unedited  # the edits change what the model says
    return dict(ids=ids, unedited=unedited, edited=edited, adapter=adapter.path, merged=merged.path, n=len(records),
                unedited_logits=unedited_logits, edited_logits=edited_logits, out=out)


def llama(path, **kw):
    # One thread: the suite runs a test per core, and llama.cpp's spinning threads crawl on a shared core.
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, logits_all=True,
                           verbose=False, **kw)


def test_llama_cpp_with_the_gguf_lora_says_what_the_edited_model_says(exported):
    llm = llama(default_gguf_path(), lora_path=str(exported["adapter"]))
    got = llama_logits(llm, exported["ids"]).argmax(-1).tolist()
    n = exported["n"]
    assert got[:n] == exported["edited"][:n]  # every edit prompt
    # The base's Q4_1 products quantize the activations to 8 bits (transformers computes in float32): a prompt
    # whose top two logits are within that noise may differ; the bench measures it on 30 prompts.
    assert sum(a != b for a, b in zip(got, exported["edited"], strict=True)) <= 1


def test_adapter_scale_zero_is_the_unedited_model(exported):
    llm = llama(default_gguf_path(), lora_path=str(exported["adapter"]))
    set_scale(llm, 0.0)
    scale0 = llama_logits(llm, exported["ids"])
    base = llama_logits(llama(default_gguf_path()), exported["ids"])
    assert np.array_equal(scale0, base)  # the adapter adds exactly nothing at scale 0
    assert scale0.argmax(-1).tolist() == exported["unedited"]
    set_scale(llm, 1.0)  # and back: the edits again
    assert llama_logits(llm, exported["ids"]).argmax(-1).tolist()[:exported["n"]] == exported["edited"][:exported["n"]]


def test_the_merged_gguf_says_what_the_edited_model_says(exported):
    got = llama_logits(llama(exported["merged"]), exported["ids"]).argmax(-1).tolist()
    n = exported["n"]
    assert got[:n] == exported["edited"][:n]
    assert sum(a != b for a, b in zip(got, exported["edited"], strict=True)) <= 1


def test_in_float32_llama_cpp_computes_what_factedit_computes(exported):
    """The base GGUF dequantized to F32 (export_gguf_f32): llama.cpp then multiplies in float32 like transformers,
    and base + GGUF LoRA gives factedit's edited logits to within 0.1 on every prompt; at scale 0, the unedited."""
    base = export_gguf_f32(default_gguf_path(), exported["out"] / "base-f32.gguf")
    llm = llama(base, lora_path=str(exported["adapter"]))
    with_adapter = llama_logits(llm, exported["ids"])
    assert with_adapter.argmax(-1).tolist() == exported["edited"]
    assert float(np.abs(with_adapter - exported["edited_logits"]).max()) < 0.1
    set_scale(llm, 0.0)
    scale0 = llama_logits(llm, exported["ids"])
    assert scale0.argmax(-1).tolist() == exported["unedited"]
    assert float(np.abs(scale0 - exported["unedited_logits"]).max()) < 0.1
