"""Edits in llama.cpp (issue 23): the default model edited by factedit, exported as a GGUF LoRA adapter and as a
merged GGUF, run by the real engine (llama-cpp-python), compared token for token with factedit's edited model.

    .venv/bin/python bench/bench_llama_cpp.py                        # ft_l, CounterFact val[900:910], rank 64
    .venv/bin/python bench/bench_llama_cpp.py --method ultraedit --rank 32 --json /tmp/llama.json
    .venv/bin/python bench/bench_llama_cpp.py --server /tmp/llama-server   # also llama.cpp's own HTTP server

Needs `llama-cpp-python` built for this CPU (README, "Edits in other engines"): CMAKE_ARGS="-DGGML_NATIVE=OFF".

For each of the N edits: the edit prompt, its paraphrase (rephrase_prompt) and its neighbour (locality_prompt),
3N prompts. The token ids come from factedit's tokenizer and go to llama.cpp as ids (so tokenization plays no
part), and the greedy next token is compared:
- factedit: the model factedit edits, loaded from the same Q4_1 GGUF by transformers (dequantized to float32),
  edited (`edited`) and not (`unedited`); `adapter in torch`: the base plus the exported adapter's B·A (isolates
  the truncated SVD of dense edits from the engine);
- llama.cpp: base GGUF + GGUF LoRA at scale 1 (`Llama(model_path=..., lora_path=...)`), the same loaded adapter
  at scale 0 (llama_set_adapters_lora, the call llama.cpp's server makes for a request's `lora` field), the base
  alone, and the merged GGUF (edited tensors F32, the rest the base's Q4_1/Q8_0 bytes);
- with --server: llama.cpp's llama-server with `--lora`, each request's `lora: [{"id": 0, "scale": s}]`.
Where llama.cpp and factedit differ, the factedit margin (top-1 minus top-2 logit) says how close the call was.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from records import counterfact_split

import factedit
from factedit.artifacts.gguf_export import export_gguf_f32, gguf_tensor_name, read_gguf_lora
from factedit.model.loading import default_gguf_path
from factedit.model.specs import weight_layout


def torch_logits(model, ids: list[list[int]]) -> np.ndarray:
    with torch.no_grad():
        return np.stack([model(torch.tensor([i])).logits[0, -1].float().numpy() for i in ids])


def llama_logits(llm, ids: list[list[int]]) -> np.ndarray:
    rows = []
    for i in ids:
        llm.reset()  # nothing cached from an earlier prompt (or an earlier adapter scale)
        llm.eval(i)
        rows.append(np.array(llm.scores[len(i) - 1], dtype=np.float32))
    return np.stack(rows)


def set_scale(llm, scale: float) -> None:
    """The loaded adapter's scale on this context: llama_set_adapters_lora, as llama-server does per request."""
    import llama_cpp

    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
    scales = (ctypes.c_float * 1)(scale)
    if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales) != 0:
        raise RuntimeError("llama_set_adapters_lora failed")
    llm.reset()


def greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(-1)


def margin(logits: np.ndarray) -> np.ndarray:
    top = np.sort(logits, axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0]


def compare(name: str, got: np.ndarray, ref: np.ndarray, ref_logits: np.ndarray, kinds: list[str], tok,
            n_edits: int) -> dict:
    same = greedy(got) == greedy(ref)
    by_kind = {k: f"{int(same[[i for i, x in enumerate(kinds) if x == k]].sum())}/{kinds.count(k)}"
               for k in dict.fromkeys(kinds)}
    diffs = [{"prompt": int(i), "kind": kinds[i], "factedit": tok.decode([int(greedy(ref)[i])]),
              "got": tok.decode([int(greedy(got)[i])]), "factedit_margin": round(float(margin(ref_logits)[i]), 4)}
             for i in np.flatnonzero(~same)]
    return {"name": name, "agree": int(same.sum()), "of": len(same), "share": round(float(same.mean()), 4),
            "by_kind": by_kind, "every_edit_prompt": bool(same[:n_edits].all()), "differences": diffs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_tokens(binary: str, base: Path, adapter: Path | None, ids: list[list[int]], scales: list[float | None],
                  threads: int) -> dict[float | None, list[int]]:
    """llama-server (with --lora when `adapter`); the greedy next token per prompt for each per-request adapter
    scale (None: no `lora` field)."""
    port = free_port()
    lora = ["--lora", str(adapter)] if adapter else []
    proc = subprocess.Popen([binary, "-m", str(base), *lora, "--port", str(port), "--host",
                             "127.0.0.1", "-t", str(threads), "-c", "1024", "-np", "1", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("llama-server did not come up")
        out = {}
        for scale in scales:
            tokens = []
            for i in ids:
                request = {"prompt": i, "n_predict": 1, "temperature": 0, "top_k": 1, "cache_prompt": False,
                           "return_tokens": True}
                if scale is not None:
                    request["lora"] = [{"id": 0, "scale": scale}]
                body = json.dumps(request).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body,
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    tokens.append(int(json.loads(r.read())["tokens"][0]))
            out[scale] = tokens
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=900, help="first CounterFact val record")
    parser.add_argument("--n", type=int, default=10, help="edits")
    parser.add_argument("--method", default="ft_l")
    parser.add_argument("--batch", action="store_true", help="one edit_batch instead of sequential edits")
    parser.add_argument("--rank", type=int, default=64, help="SVD rank for dense edits (576: full, exact)")
    parser.add_argument("--journal", default=None,
                        help="keep the edits in this journal; edits it holds already are replayed, not redone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server", default=None, help="a llama-server binary: also check its per-request lora")
    parser.add_argument("--out", default=None, help="folder for the GGUF files (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-llama-cpp-"))
    out.mkdir(parents=True, exist_ok=True)
    records = counterfact_split("val")[args.start:args.start + args.n]
    prompts = [r["prompt"] for r in records] + [r["rephrase_prompt"] for r in records] + [
        r["locality_prompt"] for r in records]
    kinds = ["edit"] * len(records) + ["paraphrase"] * len(records) + ["neighbour"] * len(records)
    base_gguf = default_gguf_path()

    model, tok = factedit.load_model()
    ids = [tok(p).input_ids for p in prompts]
    unedited = torch_logits(model, ids)
    editor = factedit.Editor(args.method, tokenizer=tok, journal=args.journal)
    editor.attach(model)  # replays a journal's edits
    t = time.perf_counter()
    if editor.history:
        print(f"replayed {len(editor.history)} edit(s) from {args.journal}")
    elif args.batch:
        editor.edit_batch(model, [{"prompt": r["prompt"], "target": r["target_new"], "subject": r["subject"]}
                                  for r in records])
    else:
        for r in records:
            editor.edit(model, r["prompt"], r["target_new"], subject=r["subject"])
    edit_s = time.perf_counter() - t
    edited = torch_logits(model, ids)
    t = time.perf_counter()
    adapter = editor.export_adapter(out / "edits.gguf", format="gguf", rank=args.rank)
    adapter_s = time.perf_counter() - t
    t = time.perf_counter()
    merged = editor.export_merged(model, out / "merged.gguf", format="gguf")
    merged_s = time.perf_counter() - t
    merged_f32 = editor.export_merged(model, out / "merged-f32.gguf", format="gguf", dtype="f32-all")
    base_f32 = out / "base-f32.gguf"
    if not base_f32.exists():
        export_gguf_f32(base_gguf, base_f32)

    # The adapter's B·A on a fresh copy of the unedited weights, in torch: what the adapter says, without the engine.
    touched = list(dict.fromkeys(n for r in editor.history for n in r.params))
    editor.close()
    del model
    fresh, _ = factedit.load_model()
    pairs, _ = read_gguf_lora(adapter.path)
    params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name in touched:
            a, b = pairs[gguf_tensor_name(fresh, name, adapter.architecture)]
            change = b.double() @ a.double()
            params[name].add_((change.T if weight_layout(fresh, name) == "in_out" else change).float())
    via_adapter = torch_logits(fresh, ids)
    del fresh

    common = dict(n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False)
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter.path), **common)
    load_s = time.perf_counter() - t
    with_adapter = llama_logits(llm, ids)
    set_scale(llm, 0.0)
    scale0 = llama_logits(llm, ids)
    set_scale(llm, 1.0)
    again = llama_logits(llm, ids)
    # The completion path llama-cpp-python's server serves (its own tokenizer, its own sampler), greedy.
    text1 = [llm.create_completion(p, max_tokens=1, temperature=0.0)["choices"][0]["text"] for p in prompts]
    set_scale(llm, 0.0)
    text0 = [llm.create_completion(p, max_tokens=1, temperature=0.0)["choices"][0]["text"] for p in prompts]
    del llm
    plain = llama_cpp.Llama(model_path=str(base_gguf), **common)
    base_logits = llama_logits(plain, ids)
    del plain
    merged_llm = llama_cpp.Llama(model_path=str(merged.path), **common)
    merged_logits = llama_logits(merged_llm, ids)
    del merged_llm
    # The same files in float32 throughout (every tensor dequantized): llama.cpp without quantized arithmetic.
    f32_lora = llama_cpp.Llama(model_path=str(base_f32), lora_path=str(adapter.path), **common)
    f32_with_adapter = llama_logits(f32_lora, ids)
    set_scale(f32_lora, 0.0)
    f32_scale0 = llama_logits(f32_lora, ids)
    del f32_lora
    f32_merged = llama_logits(llama_cpp.Llama(model_path=str(merged_f32.path), **common), ids)

    n = len(records)
    rows = [
        compare("llama.cpp base+LoRA vs factedit edited", with_adapter, edited, edited, kinds, tok, n),
        compare("adapter in torch vs factedit edited (SVD only)", via_adapter, edited, edited, kinds, tok, n),
        compare("llama.cpp base+LoRA vs adapter in torch (engine only)", with_adapter, via_adapter, via_adapter,
                kinds, tok, n),
        compare("llama.cpp merged GGUF (F32 edited tensors) vs factedit edited", merged_logits, edited, edited,
                kinds, tok, n),
        compare("llama.cpp LoRA scale 0 vs factedit unedited", scale0, unedited, unedited, kinds, tok, n),
        compare("llama.cpp LoRA scale 0 vs llama.cpp base alone", scale0, base_logits, base_logits, kinds, tok, n),
        compare("llama.cpp base alone vs factedit unedited", base_logits, unedited, unedited, kinds, tok, n),
        compare("llama.cpp F32 base+LoRA vs adapter in torch", f32_with_adapter, via_adapter, via_adapter, kinds,
                tok, n),
        compare("llama.cpp F32 base+LoRA vs factedit edited", f32_with_adapter, edited, edited, kinds, tok, n),
        compare("llama.cpp F32 merged GGUF vs factedit edited", f32_merged, edited, edited, kinds, tok, n),
        compare("llama.cpp F32 base, LoRA scale 0 vs factedit unedited", f32_scale0, unedited, unedited, kinds,
                tok, n),
        compare("factedit edited vs factedit unedited (what the edits changed)", edited, unedited, unedited, kinds,
                tok, n),
    ]
    expected1 = [tok.decode([int(x)]) for x in greedy(edited)]
    expected0 = [tok.decode([int(x)]) for x in greedy(unedited)]
    same1 = sum(a == b for a, b in zip(text1, expected1, strict=True))
    same0 = sum(a == b for a, b in zip(text0, expected0, strict=True))
    completion = {"scale 1 text == factedit edited token": f"{same1}/{n * 3}",
                  "scale 0 text == factedit unedited token": f"{same0}/{n * 3}"}
    figures = {
        "method": args.method, "mode": "edit_batch" if args.batch else "sequential",
        "records": f"CounterFact val[{args.start}:{args.start + n}]", "edit_s": round(edit_s, 1),
        "llama_cpp_version": llama_cpp.__version__, "base_gguf": base_gguf.name,
        "adapter": {"rank": adapter.rank, "tensors": list(adapter.tensors), "svd_rank": adapter.svd_rank,
                    "svd_errors": {k: round(v, 4) for k, v in adapter.svd_errors.items()},
                    "bytes": adapter.path.stat().st_size, "export_s": round(adapter_s, 2)},
        "merged": {"tensors": dict(merged.tensors), "bytes": merged.path.stat().st_size,
                   "edit_errors": {k: float(f"{v:.3g}") for k, v in merged.edit_errors.items()},
                   "export_s": round(merged_s, 2)},
        "llama_load_s": round(load_s, 2),
        "scale 0 vs base alone, max |Δ logit|": float(np.abs(scale0 - base_logits).max()),
        "scale 1 after scale 0, max |Δ logit| to the first scale-1 run": float(np.abs(again - with_adapter).max()),
        "llama.cpp LoRA vs factedit edited, max |Δ logit|": float(np.abs(with_adapter - edited).max()),
        "llama.cpp LoRA vs adapter in torch, max |Δ logit|": float(np.abs(with_adapter - via_adapter).max()),
        "llama.cpp base vs factedit unedited, max |Δ logit|": float(np.abs(base_logits - unedited).max()),
        "llama.cpp F32 base+LoRA vs adapter in torch, max |Δ logit|": float(
            np.abs(f32_with_adapter - via_adapter).max()),
        "llama.cpp F32 merged vs factedit edited, max |Δ logit|": float(np.abs(f32_merged - edited).max()),
        "llama.cpp base vs factedit unedited, median |Δ logit| at factedit's top token": float(np.median(np.abs(
            np.take_along_axis(base_logits - unedited, greedy(unedited)[:, None], 1)))),
        "factedit edited, margin on the edit prompts (top-1 minus top-2 logit)": [
            round(float(x), 3) for x in margin(edited)[:n]],
        "rows": rows, "completion path (llama.cpp tokenizer)": completion,
    }
    if args.server:
        got = server_tokens(args.server, base_gguf, adapter.path, ids, [1.0, 0.0], args.threads)
        alone = server_tokens(args.server, base_gguf, None, ids, [None], args.threads)[None]
        zero = np.eye(unedited.shape[1], dtype=np.float32)[got[0.0]]
        rows.append(compare("llama-server lora scale 0 vs llama-server without the adapter", zero,
                            np.eye(unedited.shape[1], dtype=np.float32)[alone], unedited, kinds, tok, n))
        for scale, ref, label, engine, engine_label in (
                (1.0, edited, "factedit edited", with_adapter, "llama-cpp-python base+LoRA"),
                (0.0, unedited, "factedit unedited", base_logits, "llama-cpp-python base alone")):
            as_logits = np.eye(ref.shape[1], dtype=np.float32)[got[scale]]
            rows.append(compare(f"llama-server lora scale {scale:g} vs {label}", as_logits, ref, ref, kinds, tok, n))
            rows.append(compare(f"llama-server lora scale {scale:g} vs {engine_label}", as_logits, engine, engine,
                                kinds, tok, n))
    print(f"{args.method} ({figures['mode']}), {figures['records']}: {n} edits in {edit_s:.0f} s; GGUF LoRA rank "
          f"{adapter.rank} on {len(adapter.tensors)} tensors, {adapter.path.stat().st_size / 2**20:.1f} MiB; merged "
          f"GGUF {merged.path.stat().st_size / 2**20:.1f} MiB; llama-cpp-python {llama_cpp.__version__}")
    if adapter.svd_errors:
        print("  SVD relative error per tensor: " + ", ".join(f"{k} {v:.3f}" for k, v in adapter.svd_errors.items()))
    for row in rows:
        print(f"  {row['name']}: {row['agree']}/{row['of']} ({row['share']:.1%}) {row['by_kind']}, every edit "
              f"prompt: {row['every_edit_prompt']}")
        for d in row["differences"]:
            print(f"      #{d['prompt']} {d['kind']}: factedit {d['factedit']!r} (margin {d['factedit_margin']}) vs "
                  f"{d['got']!r}")
    for key in ("scale 0 vs base alone, max |Δ logit|", "scale 1 after scale 0, max |Δ logit| to the first scale-1 run",
                "llama.cpp LoRA vs factedit edited, max |Δ logit|", "llama.cpp LoRA vs adapter in torch, max |Δ logit|",
                "llama.cpp base vs factedit unedited, max |Δ logit|",
                "llama.cpp F32 base+LoRA vs adapter in torch, max |Δ logit|",
                "llama.cpp F32 merged vs factedit edited, max |Δ logit|",
                "llama.cpp base vs factedit unedited, median |Δ logit| at factedit's top token"):
        print(f"  {key}: {figures[key]:.3g}")
    print(f"  factedit edited, margins on the edit prompts: {figures[next(k for k in figures if 'margin' in k)]}")
    for key, value in completion.items():
        print(f"  completion path, {key}: {value}")
    print(f"  files in {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
