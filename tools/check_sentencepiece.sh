#!/usr/bin/env bash
# Converts a real SentencePiece tokenizer.model (Mistral 7B v0.1's, shipped in the mistral_common
# wheel) with llava-rs and with transformers, tokenises the repository's Markdown line by line
# plus some edge cases with both, and counts the strings whose ids or decoded text differ.
#   tools/check_sentencepiece.sh [PYTHON]      (PYTHON: a venv with transformers, sentencepiece, protobuf)
set -euo pipefail
PY=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --no-deps -q mistral_common -d "$WORK/wheel"
(cd "$WORK" && unzip -q -o wheel/*.whl 'mistral_common/data/tokenizer.model.v1')
mkdir "$WORK/tok"
cp "$WORK/mistral_common/data/tokenizer.model.v1" "$WORK/tok/tokenizer.model"
echo '{"add_bos_token": true, "add_eos_token": false, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": false, "tokenizer_class": "LlamaTokenizer"}' \
  > "$WORK/tok/tokenizer_config.json"
"$PY" - "$ROOT" "$WORK" <<'PY'
import json, pathlib, sys
from transformers import AutoTokenizer
root, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
strings = []
for f in sorted(root.glob("*.md")) + sorted(root.glob("tools/*.md")):
    text = f.read_text(encoding="utf-8")
    strings += text.splitlines() + [text[i:i + 2000] for i in range(0, len(text), 2000)]
strings += ["Ünïcödé café — “quotes” 日本語 한국어 🙂🚀 Привет", "   leading", "trailing   ", "a\tb\n\nc",
            "USER: <image>\nWhat? ASSISTANT: It is.</s>USER: more? ASSISTANT:", "[INST] hi [/INST]", "x" * 500]
(work / "tok" / "strings.json").write_text(json.dumps(strings))
t = AutoTokenizer.from_pretrained(str(work / "tok"))
ref = {"ids": [t(s).input_ids for s in strings],
       "decoded": [t.decode(t(s, add_special_tokens=False).input_ids, skip_special_tokens=True) for s in strings]}
(work / "hf.json").write_text(json.dumps(ref))
PY
(cd "$ROOT" && cargo run --release -q -p llava-data --example tokenize_strings -- \
  "$WORK/tok" "$WORK/tok/strings.json" > "$WORK/ours.json")
"$PY" - "$WORK" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
ref, ours = json.loads((work / "hf.json").read_text()), json.loads((work / "ours.json").read_text())
n = len(ref["ids"])
ids = sum(a != b for a, b in zip(ref["ids"], ours["ids"]))
dec = sum(a != b for a, b in zip(ref["decoded"], ours["decoded"]))
tokens = sum(map(len, ref["ids"]))
print(f"{n} strings, {tokens} tokens: {ids} differ in ids, {dec} in decoded text")
sys.exit(1 if ids or dec else 0)
PY
