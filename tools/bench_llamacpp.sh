#!/usr/bin/env bash
# BENCHMARKS.md, "CPU against llama.cpp" (issue 32): `llava generate` beside llama.cpp's
# llama-bench on the same random-weight tiny-1b language model, in one run, 2 threads, two
# alternating rounds: bf16 against f16, --load-8bit against Q8_0, --load-4bit against Q4_K_M.
# llama.cpp comes from the llama-cpp-python sdist (tools/build_llamacpp.sh, no download at run
# time beyond PyPI). Prefill: llava-rs's 617-position prompt (one image, 576 positions, and the
# question) against llama-bench's 617-token prompt from an empty context; decode: 32 tokens after
# the prompt against llama-bench's 32 tokens at depth 617. llama-bench has no vision tower; MTMD=1
# (below) adds the peer's whole pipeline.
# BEFORE=path/to/an/older/llava also runs that binary in each round, beside this tree's, for an
# alternating before/after pair; ROWS="bf16 8-bit" limits the formats; ROUNDS sets the rounds.
# MTMD=1 also runs llama-mtmd-cli on the same picture (the mmproj tower and projector in f16, then
# the decoder in the row's format): vision, prefill, decode and peak RSS of the whole pipeline.
#   tools/bench_llamacpp.sh [CHECKPOINT_DIR] [PYTHON] [WORK]
source "$(dirname "$0")/bench_cpu_setup.sh" "${1:-}" "${2:-}"
work=${3:-/tmp/llamacpp}
PY=$py tools/build_llamacpp.sh "$ckpt" "$work" f16 q8_0 q4_k_m > /tmp/bench_llamacpp_build.log
img=tests/fixtures/models/images/shapes_64x48.png
lscpu | grep -E "Model name" | sed 's/  */ /g'
echo "flags: $(grep -o -w 'avx2\|avx512f\|avx512_bf16\|avx512_vnni\|amx_tile\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for row in "bf16|f16|--dtype bf16" "8-bit|q8_0|--load-8bit" "4-bit|q4_k_m|--load-4bit"; do
    IFS='|' read -r ours gguf flags <<< "$row"
    [[ " ${ROWS:-bf16 8-bit 4-bit} " == *" $ours "* ]] || continue
    for bin in ${BEFORE:-} $llava; do
    # shellcheck disable=SC2086
    /usr/bin/time -v -o /tmp/bench_lc_rs.txt env RAYON_NUM_THREADS=2 $bin generate --model "$ckpt" \
      --image $img --prompt "Describe the picture." --max-new-tokens 32 --ignore-eos $flags --json \
      > /tmp/bench_lc_rs.json
    label=llava-rs; [ "$bin" = "$llava" ] || label="llava-rs before ($bin)"
    "$py" - "$round" "$ours" "$(peak /tmp/bench_lc_rs.txt)" "$label" <<'PY'
import json, sys
d = json.load(open("/tmp/bench_lc_rs.json")); t = d["timings"]
print(f"round {sys.argv[1]} {sys.argv[4]} {sys.argv[2]}: vision {t['vision_ms']:.0f} ms, prefill "
      f"{d['prompt_tokens'] / t['prefill_ms'] * 1e3:.1f} tok/s ({d['prompt_tokens']} tokens), decode "
      f"{t['decode_tok_s']:.2f} tok/s, peak RSS {sys.argv[3]}")
PY
    done
    if [ -n "${MTMD:-}" ]; then
      # The whole pipeline, as `llava generate` runs it: the mmproj's vision tower and projector
      # (f16), the picture's 576 positions and the question, 32 tokens. The llava-1.5 prompt
      # is llama.cpp's `vicuna` template.
      /usr/bin/time -v -o /tmp/bench_lc_cpp.txt "$work/bin/llama-mtmd-cli" -m "$work/gguf/lm-$gguf.gguf" \
        --mmproj "$work/gguf/mmproj-model-f16.gguf" --image $img -p "Describe the picture." -n 32 -t 2 \
        --temp 0 --ignore-eos --chat-template vicuna --perf -lv 4 > /tmp/bench_lc_mtmd.txt 2>&1
      "$py" - "$round" "$gguf" "$(peak /tmp/bench_lc_cpp.txt)" <<'PY'
import re, sys
log = open("/tmp/bench_lc_mtmd.txt").read()
vision = re.search(r"encoding done in (\d+) ms", log).group(1)
prompt = re.search(r"prompt eval time = +([\d.]+) ms / +(\d+) tokens", log)
decode = re.search(r" eval time = +([\d.]+) ms / +(\d+) runs", log)
print(f"round {sys.argv[1]} llama-mtmd-cli {sys.argv[2]}: vision {vision} ms, prefill "
      f"{int(prompt.group(2)) / float(prompt.group(1)) * 1e3:.1f} tok/s ({prompt.group(2)} tokens), decode "
      f"{int(decode.group(2)) / float(decode.group(1)) * 1e3:.2f} tok/s, peak RSS {sys.argv[3]}")
PY
    fi
    for test in "-p 617 -n 0 -d 0" "-p 0 -n 32 -d 617"; do
      # shellcheck disable=SC2086
      /usr/bin/time -v -o /tmp/bench_lc_cpp.txt "$work/bin/llama-bench" -m "$work/gguf/lm-$gguf.gguf" \
        -t 2 -r 1 $test -o jsonl 2>/dev/null > /tmp/bench_lc_cpp.jsonl
      "$py" - "$round" "$gguf" "$test" "$(peak /tmp/bench_lc_cpp.txt)" <<'PY'
import json, sys
for line in open("/tmp/bench_lc_cpp.jsonl"):
    r = json.loads(line)
    kind = "prefill" if r["n_prompt"] else f"decode at depth {r.get('n_depth', 0)}"
    print(f"round {sys.argv[1]} llama.cpp {sys.argv[2]}: {kind} {r['avg_ts']:.1f} tok/s, peak RSS {sys.argv[4]}")
PY
    done
  done
done
