#!/usr/bin/env bash
# vLLM serves the default model with factedit's PEFT LoRA adapter (issue 23, item 3), checked over its OpenAI
# API against factedit's own answers. For a lent GPU machine: no network there, at most 64 MiB carried per
# call, torch and transformers preinstalled, no `gguf` (../shared/docs/environment.md, "The GPU machine").
#
#   here:      bash bench/vllm_check.sh prepare      # model halves + gguf wheel (gpu-model-chunks.sh), then
#                                                    # 10 edits exported as a PEFT adapter + expected answers
#   device 1:  carry [".gpu1"]:  bash bench/vllm_check.sh install   # first: is vLLM there? then model half 1
#   device 2:  carry [".gpu2"]:  bash bench/vllm_check.sh run       # serve, ask, compare -> $OUT/vllm_check.json
#
# `install` stops with exit code 3 and says so when vLLM is not installed on the GPU machine: its wheel and
# CUDA dependencies are far over 64 MiB a call, so it cannot be carried there.
# prepare's settings: METHOD (ft_l), START (900), N (10), RANK (64: SVD rank of dense edits, a vLLM rank),
# JOURNAL (a journal of these edits, e.g. from bench_llama_cpp.py --journal: replayed instead of editing again).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    if [ ! -f .gpu1/gguf.part00 ] || [ ! -f .gpu2/gguf.part01 ]; then ../shared/tools/gpu-model-chunks.sh; fi
    rm -rf .gpu2/vllm
    METHOD=${METHOD:-ft_l} START=${START:-900} N=${N:-10} RANK=${RANK:-64} JOURNAL=${JOURNAL:-} .venv/bin/python - <<'EOF'
import json, os, torch
from pathlib import Path
import factedit
from factedit.paths import PACKAGE_DIR

method, start, n, rank = os.environ["METHOD"], int(os.environ["START"]), int(os.environ["N"]), int(os.environ["RANK"])
records = json.loads((PACKAGE_DIR / "data/counterfact/val.json").read_text())[start:start + n]
prompts = [r["prompt"] for r in records] + [r["rephrase_prompt"] for r in records] + [r["locality_prompt"] for r in records]
kinds = ["edit"] * n + ["paraphrase"] * n + ["neighbour"] * n
model, tok = factedit.load_model()
ids = [tok(p).input_ids for p in prompts]

def answers(m):
    with torch.no_grad():
        logits = torch.stack([m(torch.tensor([i])).logits[0, -1].float() for i in ids])
    top = logits.topk(2, dim=-1)
    return top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()

unedited, unedited_margin = answers(model)
editor = factedit.Editor(method, tokenizer=tok, journal=os.environ.get("JOURNAL") or None)
editor.attach(model)  # a JOURNAL's edits are replayed, not redone
if not editor.history:
    for r in records:
        editor.edit(model, r["prompt"], r["target_new"], subject=r["subject"])
edited, edited_margin = answers(model)
out = Path(".gpu2/vllm")
result = editor.export_adapter(out / "adapter", rank=rank)
problems = factedit.check_vllm_compatible(result.path)
assert not problems, problems
(out / "expected.json").write_text(json.dumps({
    "method": method, "records": f"CounterFact val[{start}:{start + n}]", "rank": result.rank,
    "svd_errors": result.svd_errors, "prompts": prompts, "kinds": kinds, "ids": ids,
    "edited": edited, "edited_margin": edited_margin, "unedited": unedited, "unedited_margin": unedited_margin,
    "edited_text": [tok.decode([t]) for t in edited], "unedited_text": [tok.decode([t]) for t in unedited],
}, indent=1))
print(f"{n} {method} edits -> {result.path} (rank {result.rank}); expected answers in {out / 'expected.json'}")
EOF
    du -sh .gpu1 .gpu2 ;;
  install)
    if ! python3 -c "import vllm" 2>/dev/null; then
      echo "vLLM is NOT installed on this GPU machine (python3 -c 'import vllm' fails; pip: $(python3 -m pip show vllm 2>&1 | head -1))."
      echo "It cannot be carried here (the wheel and its CUDA dependencies are far over 64 MiB a call): check stopped."
      exit 3
    fi
    python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    mkdir -p /root/m && cp .gpu1/gguf.part00 /root/m/
    python3 -m pip install -q --no-index --no-deps --target /root/site .gpu1/*.whl
    echo "installed; now the run call with carry [\".gpu2\"]" ;;
  run)
    python3 -c "import vllm" || { echo "vLLM is not installed here"; exit 3; }
    [ -f /root/m/gguf.part00 ] || { echo "no /root/m/gguf.part00: the machine went cold; repeat install"; exit 4; }
    cat /root/m/gguf.part00 .gpu2/gguf.part01 > /root/m/SmolLM2-135M-Instruct.Q4_1.gguf
    export PYTHONPATH=/root/site VLLM_CHECK_DIR=$PWD/.gpu2/vllm OUT=${OUT:-/tmp/vllm-out}
    mkdir -p "$OUT"
    python3 - <<'EOF'
import json, os, subprocess, time, urllib.request
from pathlib import Path
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

check = Path(os.environ["VLLM_CHECK_DIR"])
expected = json.loads((check / "expected.json").read_text())
adapter = check / "adapter"
config = json.loads((adapter / "adapter_config.json").read_text())
hf = Path("/root/hf")
if not (hf / "config.json").exists():  # the same float32 weights factedit loads (the Q4_1 GGUF dequantized)
    model = AutoModelForCausalLM.from_pretrained("/root/m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(hf)
    AutoTokenizer.from_pretrained("/root/m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(hf)
tok = AutoTokenizer.from_pretrained(hf)
ids, n = expected["ids"], len(expected["ids"]) // 3

# Reference in vLLM's dtype: transformers in bfloat16 on this GPU, with and without the adapter's B·A·alpha/r.
def reference(delta: bool) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).cuda().eval()
    if delta:
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        params = dict(model.named_parameters())
        scale = config["lora_alpha"] / config["r"]
        with torch.no_grad():
            for key, a in tensors.items():
                if key.endswith(".lora_A.weight"):
                    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    b = tensors[key.replace("lora_A", "lora_B")]
                    w = params[module + ".weight"]
                    w.copy_((w.double() + (b.double() @ a.double() * scale).to(w.device)).to(w.dtype))
    with torch.no_grad():
        return [int(model(torch.tensor([i], device="cuda")).logits[0, -1].argmax()) for i in ids]

ref_edited, ref_unedited = reference(True), reference(False)
torch.cuda.empty_cache()

port, rank = 8011, config["r"]
cmd = ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf), "--served-model-name", "base",
       "--dtype", "bfloat16", "--enable-lora", "--lora-modules", f"facts={adapter}", "--max-lora-rank", str(rank),
       "--max-loras", "1", "--max-model-len", "512", "--enforce-eager", "--gpu-memory-utilization", "0.3",
       "--port", str(port), "--host", "127.0.0.1"]
log = open(Path(os.environ["OUT"]) / "vllm_server.log", "w")
server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
try:
    start = time.time()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() - start > 400:
            raise SystemExit(f"vLLM did not start (see {log.name}); last lines:\n"
                             + "".join(open(log.name).readlines()[-30:]))
        time.sleep(2)
    up_s = time.time() - start

    def ask(model: str) -> list[int | None]:
        tokens = []
        for i in ids:  # token ids as the prompt: no tokenization difference
            body = {"model": model, "prompt": i, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                    "return_tokens_as_token_ids": True}
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                choice = json.loads(r.read())["choices"][0]
            token = (choice.get("logprobs") or {}).get("tokens", [None])[0]
            if isinstance(token, str) and token.startswith("token_id:"):
                tokens.append(int(token.split(":", 1)[1]))
            else:  # an older vLLM: compare the text
                tokens.append(tok.encode(choice["text"], add_special_tokens=False)[0] if choice["text"] else None)
        return tokens

    got_edited, got_base = ask("facts"), ask("base")
finally:
    server.terminate()
    server.wait(timeout=60)

def agree(got, ref, margins=None):
    same = [a == b for a, b in zip(got, ref)]
    diff = [{"prompt": k, "kind": expected["kinds"][k], "ref": tok.decode([ref[k]]),
             "got": None if got[k] is None else tok.decode([got[k]]),
             "factedit_margin": None if margins is None else round(margins[k], 3)}
            for k, s in enumerate(same) if not s]
    return {"agree": sum(same), "of": len(same), "every_edit_prompt": all(same[:n]), "differences": diff}

import vllm
report = {
    "vllm": vllm.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
    "adapter_rank": rank, "method": expected["method"], "records": expected["records"], "server_start_s": round(up_s, 1),
    "vLLM LoRA vs factedit edited (fp32, CPU)": agree(got_edited, expected["edited"], expected["edited_margin"]),
    "vLLM LoRA vs transformers bf16 + B·A (same dtype)": agree(got_edited, ref_edited),
    "vLLM base vs factedit unedited": agree(got_base, expected["unedited"], expected["unedited_margin"]),
    "vLLM base vs transformers bf16": agree(got_base, ref_unedited),
}
(Path(os.environ["OUT"]) / "vllm_check.json").write_text(json.dumps(report, indent=1))
for key, value in report.items():
    if isinstance(value, dict):
        print(f"{key}: {value['agree']}/{value['of']}, every edit prompt: {value['every_edit_prompt']}")
        for d in value["differences"]:
            print(f"    #{d['prompt']} {d['kind']}: expected {d['ref']!r} got {d['got']!r} (margin {d['factedit_margin']})")
    else:
        print(f"{key}: {value}")
EOF
    ;;
  *) echo "usage: $0 prepare | install | run" >&2; exit 2 ;;
esac
