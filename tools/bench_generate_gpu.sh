#!/usr/bin/env bash
# BENCHMARKS.md, generation on a GPU: a `--features cuda` build of `llava generate --json` and
# transformers on the same random-weight tiny-1b checkpoint and prompt as
# tools/bench_generate.sh (1 image + 41 text tokens = 617, 32 new tokens, greedy), f32 and bf16.
# Each side runs once unreported first (kernel loading, cuBLAS set-up). Run from the repo root on
# the GPU machine, after tools/cuda_check.sh has shown where the binary and libraries are:
#   LLAVA_BIN=... bash tools/bench_generate_gpu.sh [CHECKPOINT_DIR] [PYTHON]
set -euo pipefail
ckpt=${1:-/tmp/llava-tiny-1b}
py=${2:-python3}
llava=${LLAVA_BIN:-target-cuda/release/llava}
img=tests/fixtures/models/images/shapes_64x48.png
[ -f "$ckpt/config.json" ] || "$llava" init --shape tiny-1b --out "$ckpt"
for dtype in f32 bf16; do
  echo "llava-rs $dtype: $("$llava" generate --cuda 0 --model "$ckpt" --image $img \
    --prompt "Describe the picture." --max-new-tokens 32 --ignore-eos --dtype $dtype --json --warmup 1 \
    | "$py" -c 'import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ("prompt_tokens","timings")}, d["token_ids"][:8])')"
  tdtype=$([ $dtype = f32 ] && echo float32 || echo bfloat16)
  echo "transformers $dtype: $("$py" tools/bench_transformers.py --model "$ckpt" --image $img \
    --dtype $tdtype --device cuda --repeat 2 --max-new-tokens 32)"
done
