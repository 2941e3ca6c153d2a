#!/usr/bin/env bash
# BENCHMARKS.md, reuse of a shared prompt beginning (the conversation cache), on the random-weight
# tiny-1b checkpoint (CLIP ViT-L/14-336 + TinyLlama-1.1B shape), CPU, 2 threads, greedy, 16 new
# tokens a reply (EOS ignored):
# - `llava chat`: three turns about one image; prints each turn's --timings line;
# - `llava eval answer`: three questions about one image; prints the run's summary.
# Each binary given runs both, alternating ROUNDS times so that they see the same machine noise,
# with the process's wall time. A binary from before the cache (no --timings) is timed whole.
#   tools/bench_prompt_cache.sh CHECKPOINT_DIR DTYPE ROUNDS LLAVA_BINARY [LLAVA_BINARY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=$1 dtype=$2 rounds=$3
shift 3
images=tests/fixtures/models/images
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
questions=("Describe the picture." "What colours does it use?" "Is there any writing in it?")
printf '%s\n' "${questions[@]}" > "$tmp/chat.txt"
for i in 0 1 2; do
  printf '{"question_id": %d, "image": "shapes_64x48.png", "text": "%s", "category": "conv"}\n' \
    "$i" "${questions[$i]}"
done > "$tmp/questions.jsonl"
elapsed() { echo "$(date +%s.%N) - $1" | bc; }
for round in $(seq "$rounds"); do
  for bin in "$@"; do
    flags=()
    if "$bin" chat --help | grep -q -- --timings; then flags=(--timings); fi
    start=$(date +%s.%N)
    RAYON_NUM_THREADS=2 "$bin" chat --model "$ckpt" --image $images/shapes_64x48.png --dtype "$dtype" \
      --max-new-tokens 16 --ignore-eos "${flags[@]}" < "$tmp/chat.txt" 2>&1 >/dev/null | grep '^(' || true
    echo "round $round, $bin, $dtype, chat: $(elapsed "$start") s wall"
    rm -f "$tmp/answers.jsonl"
    start=$(date +%s.%N)
    RAYON_NUM_THREADS=2 "$bin" eval answer --model "$ckpt" --questions "$tmp/questions.jsonl" \
      --image-folder $images --out "$tmp/answers.jsonl" --dtype "$dtype" --max-new-tokens 16 \
      --ignore-eos 2>&1 | grep 'questions:' || true
    echo "round $round, $bin, $dtype, eval answer: $(elapsed "$start") s wall"
  done
done
