#!/usr/bin/env bash
# Builds llama.cpp (llama-server, llama-bench, llama-mtmd-cli, llama-quantize) from the
# `llama-cpp-python` source package on PyPI, the peer's own release, and converts a llava-rs
# checkpoint's language model to GGUF with llama.cpp's convert_hf_to_gguf.py. Used by
# bench_serve.sh (llama-server beside `llava serve`) and by the llama-bench comparison.
#
#   tools/build_llamacpp.sh [CKPT] [WORK] [OUTTYPE...]
#
# CKPT (default /tmp/llava-tiny-1b): a LLaVA checkpoint as `llava init` writes it.
# WORK (default /tmp/llamacpp): where the source, the build and the GGUFs go.
# OUTTYPE (default f16): convert_hf_to_gguf.py's --outtype for each GGUF (f32, f16, bf16, q8_0);
# q4_k_m and other k-quants are made from the f16 GGUF with llama-quantize.
# Writes WORK/bin/{llama-server,llama-bench,llama-mtmd-cli,llama-quantize}, WORK/gguf/lm-OUTTYPE.gguf,
# WORK/gguf/mmproj-model-f16.gguf (the vision tower and projector) and WORK/llava15-text.jinja (the chat template); re-running reuses what is there. Needs cmake
# and ninja, which it pip-installs into the venv with gguf and sentencepiece. Compiles at
# `nice -n 19`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ckpt=${1:-/tmp/llava-tiny-1b}
work=${2:-/tmp/llamacpp}
shift $(($# < 2 ? $# : 2))
outtypes=("${@:-f16}")
py=${PY:-/work/venv/bin/python}
bin=$(dirname "$py")
mkdir -p "$work/bin" "$work/gguf"

"$py" -c "import gguf, sentencepiece, safetensors, cmake, ninja" 2>/dev/null ||
  "$py" -m pip install gguf sentencepiece safetensors cmake ninja

# 1. The source: the newest llama-cpp-python sdist, whose vendor/llama.cpp is the llama.cpp it
# wraps. --no-build-isolation: pip only reads its metadata (scikit-build-core), so it does not
# build cmake from source to do that.
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$src" ]; then
  "$py" -c "import scikit_build_core" 2>/dev/null || "$py" -m pip install scikit-build-core
  "$py" -m pip download --no-binary :all: --no-deps --no-build-isolation llama-cpp-python -d "$work"
  tar -C "$work" -xzf "$(ls "$work"/llama_cpp_python-*.tar.gz | sort -V | tail -1)"
  src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp | sort -V | tail -1)
fi
echo "llama.cpp source: $src"

# 2. The build: CPU, native ISA (AVX-512 where the box has it), no web UI download, no TLS.
tools=(llama-server llama-bench llama-mtmd-cli llama-quantize)
missing=0
for t in "${tools[@]}"; do [ -x "$work/bin/$t" ] || missing=1; done
if [ $missing = 1 ]; then
  PATH="$bin:$PATH" nice -n 19 "$bin/cmake" -S "$src" -B "$work/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
  PATH="$bin:$PATH" nice -n 19 "$bin/cmake" --build "$work/build" -j "$(nproc)" --target "${tools[@]}"
  for t in "${tools[@]}"; do cp "$work/build/bin/$t" "$work/bin/"; done
fi
"$work/bin/llama-server" --version 2>&1 | head -2

# 3. The language model as a plain LlamaForCausalLM folder, then GGUF.
lm="$work/lm-hf"
if [ ! -f "$lm/config.json" ]; then
  nice -n 19 "$py" "$root/tools/extract_llava_lm.py" "$ckpt" "$lm"
fi
for t in "${outtypes[@]}"; do
  out="$work/gguf/lm-$t.gguf"
  [ -f "$out" ] && continue
  case $t in
    f32 | f16 | bf16 | q8_0)
      nice -n 19 "$py" "$src/convert_hf_to_gguf.py" "$lm" --outtype "$t" --outfile "$out"
      ;;
    *)
      f16="$work/gguf/lm-f16.gguf"
      [ -f "$f16" ] || nice -n 19 "$py" "$src/convert_hf_to_gguf.py" "$lm" --outtype f16 --outfile "$f16"
      nice -n 19 "$work/bin/llama-quantize" "$f16" "$out" "$(echo "$t" | tr a-z A-Z)"
      ;;
  esac
done
ls -la "$work/gguf"

# 4. The vision tower and projector as an mmproj GGUF (f16), through llama.cpp's legacy LLaVA-1.5
# converter. It reads the model with transformers 4's CLIPVisionModel layout, so transformers 4
# (and the tokenizers it accepts) goes into WORK/tf4, ahead of the venv's transformers 5 on
# PYTHONPATH for this one step.
mmproj="$work/gguf/mmproj-model-f16.gguf"
if [ ! -f "$mmproj" ]; then
  [ -d "$work/tf4/transformers" ] ||
    "$py" -m pip install -q --target "$work/tf4" --no-deps 'transformers<5' 'tokenizers==0.22.1' 'huggingface_hub<1.0'
  nice -n 19 "$py" "$root/tools/extract_llava_mmproj.py" "$ckpt" "$work/clip-hf"
  PYTHONPATH="$work/tf4:$src/gguf-py" nice -n 19 "$py" \
    "$src/tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py" -m "$work/clip-hf" \
    --llava-projector "$work/clip-hf/llava.projector" --output-dir "$work/gguf" --clip-model-is-vision
fi

# 5. The llava-1.5 conversation for text-only messages, as llama-server's Jinja engine takes it
# (--jinja --chat-template-file): "USER: {q} ASSISTANT:", the prompt `llava serve` renders from
# the checkpoint's chat_template.jinja (BOS added by both tokenizers).
cat > "$work/llava15-text.jinja" <<'JINJA'
{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}{% else %}{{ message['role'].upper() + ': ' + message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}
JINJA
