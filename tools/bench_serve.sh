#!/usr/bin/env bash
# BENCHMARKS.md, Serving: `llava serve` and llama.cpp's `llama-server -np 8` on the random-weight
# tiny-1b checkpoint, one after the other, each driven by tools/bench_serve.py the same way
# (reference answers one at a time, then CLIENTS concurrent streaming clients, then decode
# throughput at 1 and 8 streams). Builds the release binary and llama.cpp (tools/build_llamacpp.sh)
# and writes the checkpoint if missing. Each server's run holds /tmp/bench.lock.
#
#   tools/bench_serve.sh [CKPT] [PY]
#
# Environment (defaults): DTYPE (bf16, ours), GGUF (f16, llama.cpp's), SERVERS ("ours llamacpp"),
# CLIENTS (64), REQUESTS (128), PROMPTS (16), MAX_TOKENS (32), STREAM_TOKENS (64), PHASES
# (reference,load,streams), TIME_LIMIT (600 s for the load phase), MAX_RUNNING (8), MAX_QUEUE
# (64), PREFILL_CHUNK (256, ours: prompt tokens prefilled per step, 0 = whole), IMAGE (none: text prompts; a PNG sent with every reference and load request, ours only),
# OUT (/tmp/bench_serve: logs and results.jsonl).
source "$(dirname "${BASH_SOURCE[0]}")/bench_cpu_setup.sh" "${1:-/tmp/llava-tiny-1b}" "${2:-/work/venv/bin/python}"
dtype=${DTYPE:-bf16}
gguf_type=${GGUF:-f16}
servers=${SERVERS:-ours llamacpp}
out=${OUT:-/tmp/bench_serve}
max_running=${MAX_RUNNING:-8}
max_queue=${MAX_QUEUE:-64}
prefill_chunk=${PREFILL_CHUNK:-256}
mkdir -p "$out"
bench=(--clients "${CLIENTS:-64}" --requests "${REQUESTS:-128}" --prompts "${PROMPTS:-16}"
  --max-tokens "${MAX_TOKENS:-32}" --stream-tokens "${STREAM_TOKENS:-64}" --time-limit "${TIME_LIMIT:-600}" --phases "${PHASES:-reference,load,streams}"
  --out "$out/results.jsonl" --strict)
[ -n "${IMAGE:-}" ] && bench+=(--image "$IMAGE")
port=18180
llamacpp=/tmp/llamacpp
[[ " $servers " == *" llamacpp "* ]] && tools/build_llamacpp.sh "$ckpt" "$llamacpp" "$gguf_type"

wait_ready() {
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    kill -0 "$1" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}

# Starts one server (the command in "$@"), measures it under the lock, stops it.
measure() {
  local label=$1 refs=$2
  shift 2
  exec 9>/tmp/bench.lock
  flock 9
  "$@" >"$out/$label.log" 2>&1 &
  local pid=$!
  if wait_ready $pid; then
    "$py" tools/bench_serve.py --base-url "http://127.0.0.1:$port" --server-pid $pid \
      --label "$label" --reference-file "$refs" "${bench[@]}" || echo "$label: bench_serve.py reported a failure"
  else
    echo "$label: the server did not start; see $out/$label.log"
  fi
  kill $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  flock -u 9
}

suffix=${IMAGE:+-image}
for server in $servers; do
  case $server in
    ours)
      measure "llava-serve-$dtype$suffix-chunk$prefill_chunk" "$out/ref-ours-$dtype$suffix-chunk$prefill_chunk.json" \
        env RAYON_NUM_THREADS=2 "$llava" serve --model "$ckpt" --dtype "$dtype" --port $port \
        --max-running "$max_running" --max-queue "$max_queue" --prompt-cache 0 --prefill-chunk "$prefill_chunk"
      ;;
    llamacpp)
      # -c: 8 slots of the checkpoint's 2048-token context; the same greedy sampling; no
      # reuse of a slot's earlier prompt (cache_prompt false), as ours runs with --prompt-cache 0.
      bench+=(--extra-body '{"cache_prompt": false}')
      measure "llama-server-$gguf_type" "$out/ref-llamacpp-$gguf_type.json" \
        "$llamacpp/bin/llama-server" -m "$llamacpp/gguf/lm-$gguf_type.gguf" -np 8 -t 2 -tb 2 \
        -c $((8 * 2048)) --port $port --host 127.0.0.1 --jinja \
        --chat-template-file "$llamacpp/llava15-text.jinja"
      ;;
    *) echo "unknown server $server" >&2; exit 2 ;;
  esac
done
echo "results: $out/results.jsonl"
