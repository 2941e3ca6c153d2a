#!/usr/bin/env bash
# BENCHMARKS.md, batch answering: `llava eval answer` over 4 questions about 4 different images,
# one at a time (--batch-size 1) and together (--batch-size 4), beside transformers doing the
# same both ways (tools/bench_batch.py). Random-weight tiny-1b checkpoint, greedy, 32 new
# tokens each (EOS ignored), CPU, 2 threads, f32.
#   tools/bench_batch.sh [CHECKPOINT_DIR] [PYTHON]
source "$(dirname "$0")/bench_cpu_setup.sh" "$@"
images=tests/fixtures/models/images
work=$(mktemp -d)
cat > "$work/q.jsonl" <<'Q'
{"question_id": 1, "image": "shapes_64x48.png", "text": "What is it?"}
{"question_id": 2, "image": "tall_40x60.png", "text": "Describe the picture in one sentence."}
{"question_id": 3, "image": "wide_96x28.png", "text": "Which colours can you see, and where are they?"}
{"question_id": 4, "image": "texture_45x45.png", "text": "Is there a pattern?"}
Q
wall() { grep "Elapsed (wall" "$1" | awk '{print $NF}'; }
answer() { # $1: batch size, $2: extra flags
  rm -f "$work/a$1.jsonl"
  /usr/bin/time -v -o "$work/time$1.txt" env RAYON_NUM_THREADS=2 $llava eval answer --model "$ckpt" \
    --questions "$work/q.jsonl" --image-folder $images --out "$work/a$1.jsonl" \
    --max-new-tokens 32 --ignore-eos --batch-size "$1" 2> "$work/log$1.txt"
}
# The time after the questions' count is the answering alone, without loading.
answering() { grep -o "in [0-9.]* s" "$work/log$1.txt"; }
answer 1; echo "llava-rs --batch-size 1: answering $(answering 1), wall $(wall "$work/time1.txt"), peak RSS $(peak "$work/time1.txt")"
answer 4; echo "llava-rs --batch-size 4: answering $(answering 4), wall $(wall "$work/time4.txt"), peak RSS $(peak "$work/time4.txt")"
if cmp -s <(jq -c '[.question_id,.text]' "$work/a1.jsonl") <(jq -c '[.question_id,.text]' "$work/a4.jsonl"); then
  echo "llava-rs: the batched answers are the one-at-a-time answers"
else
  echo "llava-rs: the batched answers DIFFER from the one-at-a-time answers"
fi
/usr/bin/time -v -o "$work/time_py.txt" "$py" tools/bench_batch.py --model "$ckpt" --questions "$work/q.jsonl" \
  --image-folder $images --threads 2 --max-new-tokens 32
echo "transformers: peak RSS $(peak "$work/time_py.txt") (loading included in neither time above)"
rm -rf "$work"
