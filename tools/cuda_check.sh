#!/usr/bin/env bash
# GPU check of a `--features cuda` build. Run from the repo root on the GPU machine:
#
#   bash tools/cuda_check.sh            # LLAVA_BIN, CUDA_DEVICE, NVIDIA_SITE, PYTHON override
#
# For every fixture in tests/fixtures/models/*/expected.json it runs `llava generate` in f32
# with the parity test's inputs (crates/llava-model/tests/hf_parity.rs: the question through the
# chat template, the image, image_aspect_ratio, 20 greedy tokens with EOS not special) on the CPU
# and on --cuda, and compares token_ids with transformers' greedy_tokens. A bf16 run per case
# only has to succeed. Exit status 1 on any FAIL.
#
# The binary is built elsewhere (no GPU or CUDA libraries needed there; cudarc dlopens them).
# /tmp/cuda13 is nvcc from pip: the wheels nvidia-cuda-{nvcc,runtime,crt,cccl} and nvidia-nvvm
# ==13.0.* unzipped; their nvidia/cu13/{bin,nvvm} at the top, {include,lib} in
# targets/x86_64-linux (where nvcc.profile looks), and lib-static/libcudart.a linking to
# libcudart_static.a so that candle-kernels' -lcudart links statically (vendor/README.md):
#   CUDA_ROOT=/tmp/cuda13 CUDA_PATH=/tmp/cuda13 CUDA_HOME=/tmp/cuda13 PATH=/tmp/cuda13/bin:$PATH \
#   CUDA_COMPUTE_CAP=90 LIBRARY_PATH=/tmp/cuda13/lib-static CARGO_TARGET_DIR=target-cuda \
#   cargo build --release -p llava-cli --features cuda
#
# The Rust tests hold the GPU to the same oracles (built with the same variables; run from
# crates/llava-model on the GPU machine): the CUDA kernels against candle's ops, and hf_parity
# (logits, padded batch, greedy tokens against transformers) on device 0:
#   cargo test --release -p llava-model --features cuda --lib --test hf_parity --no-run
#   .../deps/llava_model-* cuda_kernels;  LLAVA_TEST_CUDA=0 .../deps/hf_parity-*
set -u
BIN=${LLAVA_BIN:-target-cuda/release/llava}
DEV=${CUDA_DEVICE:-0}
SITE=${NVIDIA_SITE:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia}
PY=${PYTHON:-python3}
FIX=tests/fixtures/models
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# The binary (~75 MB) is over what the device runner carries; a packed copy, made with
# `strip -o /tmp/llava target-cuda/release/llava && xz -9 -c /tmp/llava > target-cuda/llava.xz`
# (~10 MB), is unpacked when the binary itself is absent.
PACKED=${LLAVA_PACKED:-target-cuda/llava.xz}
if [ ! -x "$BIN" ] && [ -f "$PACKED" ]; then
    echo "== unpacking $PACKED"
    $PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$PACKED" "$TMP/llava" && chmod +x "$TMP/llava" && BIN=$TMP/llava
fi

echo "== nvidia-smi"
nvidia-smi || echo "nvidia-smi failed (rc $?)"

# cudarc dlopens libcuda (driver), libcublas(Lt), libcurand and libnvrtc: put every lib dir of
# the pip CUDA wheels (nvidia/*/lib, nvidia/cu13/lib, ...) on the path.
LIBDIRS=$(find "$SITE" -maxdepth 3 -type d \( -name lib -o -name lib64 \) 2>/dev/null | sort | paste -sd: -)
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libcuda.so.1 libcublas.so libcublasLt.so libcurand.so libnvrtc.so; do
    hits=
    [ -n "$LIBDIRS" ] && hits=$(find ${LIBDIRS//:/ } -maxdepth 1 -name "$lib*" 2>/dev/null | paste -sd' ' -)
    [ -z "$hits" ] && hits=$(ldconfig -p 2>/dev/null | grep -o "/[^ ]*$lib[^ ]*" | paste -sd' ' -)
    echo "   $lib: ${hits:-NOT FOUND}"
done

echo "== $BIN"
ls -la "$BIN" || exit 1
ldd "$BIN"
"$BIN" generate --help >/dev/null || { echo "FAIL: $BIN does not run"; exit 1; }

FAILS=0
# check NAME FIXTURE_DIR KEY_PREFIX: KEY_PREFIX "" = image case, "text_only_" = no image.
check() {
    local name=$1 dir=$2 pre=$3
    local get="import json,sys; e=json.load(open('$dir/expected.json')); v=e.get(sys.argv[1]); print('' if v is None else len(v) if isinstance(v, list) else v)"
    local question n image aspect clip template
    question=$($PY -c "$get" "${pre}question")
    n=$($PY -c "$get" "${pre}greedy_tokens")
    [ -z "$question" ] || [ -z "$n" ] && return
    local args=(generate --model "$dir/model" --prompt "$question" --max-new-tokens "$n"
        --ignore-eos --json)
    if [ -z "$pre" ]; then
        image=$($PY -c "$get" image)
        aspect=$($PY -c "$get" image_aspect_ratio)
        args+=(--image "$FIX/images/$image" --image-aspect-ratio "${aspect:-none}")
    fi
    clip=$($PY -c "$get" clip_dir)
    [ -n "$clip" ] && args+=(--vision-tower "$dir/$clip")
    template=$($PY -c "$get" conv_template)
    [ -n "$template" ] && args+=(--template "$template")
    echo "== $name: $BIN $(printf '%q ' "${args[@]}")--dtype f32 [--cuda $DEV]"
    "$BIN" "${args[@]}" --dtype f32 >"$TMP/cpu.json" 2>"$TMP/cpu.err"
    echo "   cpu rc $?: $(cat "$TMP/cpu.json" "$TMP/cpu.err")"
    "$BIN" "${args[@]}" --dtype f32 --cuda "$DEV" >"$TMP/gpu.json" 2>"$TMP/gpu.err"
    local rc=$?
    echo "   gpu rc $rc: $(cat "$TMP/gpu.json" "$TMP/gpu.err")"
    $PY - "$dir/expected.json" "${pre}greedy_tokens" "$TMP/cpu.json" "$TMP/gpu.json" <<'EOF'
import json, sys
exp = json.load(open(sys.argv[1]))
want = exp[sys.argv[2]]
margins = exp.get(sys.argv[2].replace("tokens", "margins"), [])
def ids(path):
    try:
        return json.load(open(path))["token_ids"]
    except Exception as e:
        return f"no output ({e.__class__.__name__})"
cpu, gpu = ids(sys.argv[3]), ids(sys.argv[4])
print(f"   expected {want}\n   cpu      {cpu}\n   gpu      {gpu}")
if gpu != want and isinstance(gpu, list):
    k = next((i for i, (a, b) in enumerate(zip(gpu, want)) if a != b), min(len(gpu), len(want)))
    print(f"   first difference at step {k}; transformers' margin there: {margins[k] if k < len(margins) else '?'}")
print(f"   cpu {'matches' if cpu == want else 'DIFFERS from'} transformers")
sys.exit(0 if gpu == want else 1)
EOF
    if [ $? -eq 0 ] && [ $rc -eq 0 ]; then echo "PASS $name (gpu f32)"; else echo "FAIL $name (gpu f32)"; FAILS=$((FAILS + 1)); fi
    # bf16 on the GPU: other kernels; the tokens may differ from f32, but it must run.
    if "$BIN" "${args[@]}" --dtype bf16 --cuda "$DEV" >"$TMP/bf16.json" 2>&1; then
        echo "PASS $name (gpu bf16 runs): $(cat "$TMP/bf16.json")"
    else
        echo "FAIL $name (gpu bf16 runs): $(cat "$TMP/bf16.json")"; FAILS=$((FAILS + 1))
    fi
}

for dir in "$FIX"/*/; do
    dir=${dir%/}
    [ -f "$dir/expected.json" ] || continue
    check "$(basename "$dir")" "$dir" ""
    check "$(basename "$dir") text-only" "$dir" "text_only_"
done
echo "== $FAILS failure(s)"
[ "$FAILS" -eq 0 ]
