#!/usr/bin/env bash
# BENCHMARKS.md, generation: `llava generate --json` and transformers on the same random-weight
# tiny-1b checkpoint (CLIP ViT-L/14-336 + TinyLlama-1.1B shape), same prompt (1 image + 41 text
# tokens = 617), 32 new tokens (EOS ignored), greedy, CPU, 2 threads, f32 and bf16.
#   tools/bench_generate.sh [CHECKPOINT_DIR] [PYTHON]
source "$(dirname "$0")/bench_cpu_setup.sh" "$@"
img=tests/fixtures/models/images/shapes_64x48.png
for dtype in f32 bf16; do
  /usr/bin/time -v -o /tmp/bench_rs_time.txt env RAYON_NUM_THREADS=2 $llava generate --model "$ckpt" --image $img \
    --prompt "Describe the picture." --max-new-tokens 32 --ignore-eos --dtype $dtype --json > /tmp/bench_rs.json
  echo "llava-rs $dtype: $(cat /tmp/bench_rs.json | "$py" -c 'import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ("prompt_tokens","timings")})') peak RSS $(peak /tmp/bench_rs_time.txt)"
  tdtype=$([ $dtype = f32 ] && echo float32 || echo bfloat16)
  /usr/bin/time -v -o /tmp/bench_py_time.txt "$py" tools/bench_transformers.py --model "$ckpt" --image $img \
    --dtype $tdtype --threads 2 --max-new-tokens 32 > /tmp/bench_py.json
  echo "transformers $dtype: $(cat /tmp/bench_py.json) peak RSS $(peak /tmp/bench_py_time.txt)"
done
