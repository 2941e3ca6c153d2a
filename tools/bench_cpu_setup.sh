# Sourced by the CPU benchmark scripts (bench_generate.sh, bench_quantized.sh, bench_batch.sh)
# with their arguments: goes to the repo root, builds the release binary, and writes the
# random-weight tiny-1b checkpoint when it is missing.
# Sets: ckpt (arg 1, default /tmp/llava-tiny-1b), py (arg 2, default /work/venv/bin/python),
# llava (the binary). Defines: peak FILE, the peak RSS in a `/usr/bin/time -v` report.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ckpt=${1:-/tmp/llava-tiny-1b}
py=${2:-/work/venv/bin/python}
nice -n 19 cargo build --release -p llava-cli
llava=target/release/llava
[ -f "$ckpt/config.json" ] || $llava init --shape tiny-1b --out "$ckpt"
peak() { grep "Maximum resident" "$1" | awk '{printf "%.2f GB", $6/1024/1024}'; }
