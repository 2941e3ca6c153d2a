#!/usr/bin/env bash
# The chat page in a real browser: starts `llava serve` on the tiny committed fixture and
# chromedriver, then tools/browser_check.py drives the page in headless Debian chromium (no
# browser download: `apt-get install -y chromium chromium-driver`). It attaches an image,
# asks a question at temperature 0, checks the streamed reply equals `llava generate`'s for the
# same image, question and max tokens, asks a follow-up that /metrics must show served from the
# prompt cache, and saves a screenshot of the conversation (default docs/chat.png).
#
#   cargo build -p llava-cli && tools/browser_check.sh [SCREENSHOT]
#
# LLAVA (default target/debug/llava), PORT and DRIVER_PORT may be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAVA=${LLAVA:-target/debug/llava}
PORT=${PORT:-18090}
DRIVER_PORT=${DRIVER_PORT:-18091}
SHOT=${1:-docs/chat.png}
MODEL=tests/fixtures/models/llava15-default/model
IMAGE=$PWD/tests/fixtures/models/images/shapes_64x48.png
QUESTION="What is in the image?"
MAX=24

for tool in /usr/bin/chromium /usr/bin/chromedriver "$LLAVA"; do
  if [ ! -x "$tool" ]; then
    echo "browser check skipped: $tool is missing (apt-get install -y chromium chromium-driver; cargo build -p llava-cli)" >&2
    exit 2
  fi
done

EXPECTED=$("$LLAVA" generate --model "$MODEL" --image "$IMAGE" --prompt "$QUESTION" \
  --max-new-tokens "$MAX" --temperature 0 --json | jq -r .text)

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$LLAVA" serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
/usr/bin/chromedriver --port="$DRIVER_PORT" --allowed-ips=127.0.0.1 >"$WORK/driver.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && curl -sf "http://127.0.0.1:$DRIVER_PORT/status" >/dev/null; then
    break
  fi
  sleep 0.1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }

python3 tools/browser_check.py \
  --driver "http://127.0.0.1:$DRIVER_PORT" --page "http://127.0.0.1:$PORT/" \
  --user-data-dir "$WORK/profile" --image "$IMAGE" --question "$QUESTION" \
  --max-tokens "$MAX" --expected "$EXPECTED" --screenshot "$SHOT" \
  --follow-up "And what colour is the circle?"
echo "screenshot: $SHOT"
