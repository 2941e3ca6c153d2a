#!/usr/bin/env bash
# BENCHMARKS.md, 8- and 4-bit decoders: `llava generate --json` with --load-8bit / --load-4bit
# beside f32, and transformers in f32 and with torch's dynamic int8 quantization of the language
# model's linear layers (the CPU peer of --load-8bit; torch has no 4-bit CPU path). Same
# tiny-1b checkpoint and prompt as tools/bench_generate.sh (617 tokens), 32 new tokens, greedy,
# EOS ignored, CPU, 2 threads.
#   tools/bench_quantized.sh [CHECKPOINT_DIR] [PYTHON]
source "$(dirname "$0")/bench_cpu_setup.sh" "$@"
img=tests/fixtures/models/images/shapes_64x48.png
for flag in "" --load-8bit --load-4bit; do
  /usr/bin/time -v -o /tmp/bench_q_time.txt env RAYON_NUM_THREADS=2 $llava generate --model "$ckpt" --image $img \
    --prompt "Describe the picture." --max-new-tokens 32 --ignore-eos $flag --json > /tmp/bench_q.json
  echo "llava-rs f32 $flag: $("$py" -c 'import json,sys; d=json.load(open("/tmp/bench_q.json")); print(d["timings"], d["token_ids"][:8])') peak RSS $(peak /tmp/bench_q_time.txt)"
done
for flag in "" --int8; do
  /usr/bin/time -v -o /tmp/bench_q_time.txt "$py" tools/bench_transformers.py --model "$ckpt" --image $img \
    --threads 2 --max-new-tokens 32 $flag 2> /dev/null > /tmp/bench_q_py.json
  echo "transformers f32 $flag: $("$py" -c 'import json; d=json.load(open("/tmp/bench_q_py.json")); print({k: d[k] for k in ("vision_ms","prefill_ms","decode_tok_s")}, d["token_ids"][:8])') peak RSS $(peak /tmp/bench_q_time.txt)"
done
