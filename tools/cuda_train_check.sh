#!/usr/bin/env bash
# `llava train --cuda` against the same run on the CPU, on the tiny fixture checkpoint: 8 records
# (the CLI training test's questions and answers over the fixture images), stage 2 (finetune),
# stage 1 (pretrain), stage 2 with --lora (dropout on: the masks are drawn on the CPU from the
# same key, so both devices see the same), stage 2 with --gradient-checkpointing, with --bf16, and
# LoRA under both; batch 4, constant lr, no shuffle. Per-step losses must agree to 1e-3 relative
# (1e-2 under --bf16, whose products round differently on each device); then `llava generate
# --cuda` loads the GPU-trained checkpoints. QLoRA (--bits) is CPU-only for now: the script checks
# that --cuda refuses it with a message. (The checkpointing and bf16 cases were written in a
# session without a GPU and have not run yet.) Run from the repo root
# on the GPU machine, with a `--features cuda` binary (tools/cuda_check.sh says how to build one
# and sets up the same LD_LIBRARY_PATH):
#   LLAVA_BIN=/path/to/llava PYTHON=python3 bash tools/cuda_train_check.sh
set -u
BIN=${LLAVA_BIN:-target-cuda/release/llava}
PY=${PYTHON:-python3}
FIX=tests/fixtures/models
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" - "$TMP/data.json" <<'PYEOF'
import json, sys
qa = [("What is in the picture?", "A red circle."), ("What colour is the shape?", "It is blue."),
      ("How many shapes are there?", "There are two shapes."), ("Describe the image.", "A green triangle on grey."),
      ("Where is the square?", "On the left side."), ("Is there a circle?", "Yes, there is one."),
      ("What is the background?", "The background is white."), ("Name the largest shape.", "The square is largest.")]
images = ["shapes_64x48.png", "tall_40x60.png", "texture_45x45.png"]
recs = [{"id": i, "image": images[i % 3], "conversations": [
    {"from": "human", "value": f"<image>\n{q}" if i % 2 == 0 else f"{q}\n<image>"}, {"from": "gpt", "value": a}]}
    for i, (q, a) in enumerate(qa)]
json.dump(recs, open(sys.argv[1], "w"))
PYEOF
fail=0
LORA=(--lora --lora-r 8 --lora-alpha 16 --lora-dropout 0.1)
for stage in finetune pretrain lora checkpointed bf16 lora-bf16-checkpointed; do
  tol=1e-3
  for dev in cpu gpu; do
    extra=(); [ $dev = gpu ] && extra=(--cuda 0)
    case $stage in
      lora) extra+=(--stage finetune "${LORA[@]}") ;;
      checkpointed) extra+=(--stage finetune --gradient-checkpointing) ;;
      bf16) extra+=(--stage finetune --bf16); tol=1e-2 ;;
      lora-bf16-checkpointed) extra+=(--stage finetune "${LORA[@]}" --bf16 --gradient-checkpointing); tol=1e-2 ;;
      *) extra+=(--stage $stage) ;;
    esac
    "$BIN" train --model $FIX/llava15-default/model --data "$TMP/data.json" \
      --image-folder $FIX/images --output "$TMP/$stage-$dev" --batch-size 4 --max-steps 10 \
      --lr 1e-3 --lr-scheduler constant --warmup-ratio 0 --no-shuffle "${extra[@]}" > "$TMP/$stage-$dev.log" 2>&1
    echo "$stage on $dev: rc $? $(tail -1 "$TMP/$stage-$dev.log")"
  done
  "$PY" - "$TMP/$stage-cpu/train_log.jsonl" "$TMP/$stage-gpu/train_log.jsonl" $stage $tol <<'PYEOF' || fail=1
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
print(sys.argv[3], "cpu losses", [round(x["loss"], 6) for x in a])
print(sys.argv[3], "gpu losses", [round(y["loss"], 6) for y in b])
print(sys.argv[3], "grad_norm cpu/gpu step 1:", a[0]["grad_norm"], b[0]["grad_norm"], "worst loss rel diff", worst)
ok = len(a) == len(b) == 10 and worst <= float(sys.argv[4])
print("PASS" if ok else "FAIL", sys.argv[3])
sys.exit(0 if ok else 1)
PYEOF
done
out=$("$BIN" generate --cuda 0 --model "$TMP/finetune-gpu" --image $FIX/images/shapes_64x48.png \
  --prompt "What is in the picture?" --max-new-tokens 8 --json 2>&1)
echo "generate on the GPU-trained checkpoint: $out"
echo "$out" | grep -q '"token_ids"' || fail=1
out=$("$BIN" generate --cuda 0 --model "$TMP/lora-gpu" --model-base $FIX/llava15-default/model \
  --image $FIX/images/shapes_64x48.png --prompt "What is in the picture?" --max-new-tokens 8 --json 2>&1)
echo "generate on the GPU-trained LoRA adapter over its base: $out"
echo "$out" | grep -q '"token_ids"' || fail=1
out=$("$BIN" train --cuda 0 --model $FIX/llava15-default/model --data "$TMP/data.json" \
  --image-folder $FIX/images --output "$TMP/qlora-gpu" --stage finetune "${LORA[@]}" --bits 4 \
  --max-steps 1 2>&1)
echo "QLoRA on the GPU (refused for now): $out"
echo "$out" | grep -q -- "--bits" || fail=1
echo "== $([ $fail = 0 ] && echo all passed || echo FAILED)"
exit $fail
