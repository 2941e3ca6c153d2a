"""Writes a LLaVA checkpoint's language model as a plain LlamaForCausalLM folder (config.json,
model.safetensors, the tokenizer files), which llama.cpp's convert_hf_to_gguf.py reads.

The embedding and lm_head rows beyond the tokenizer's vocabulary (llava-hf pads 32002 to 32064,
as `llava init` does) are cut: llama.cpp's loader refuses a token embedding with more rows than
the GGUF's token list. Used by tools/build_llamacpp.sh.

    python tools/extract_llava_lm.py /tmp/llava-tiny-1b /tmp/llamacpp/lm-hf
"""

import json
import shutil
import sys
from pathlib import Path

from llava_checkpoint import llava_name, source_and_destination
from safetensors import safe_open
from safetensors.torch import save_file


def lm_name(stored: str) -> str | None:
    """The LlamaForCausalLM name of a llava-hf tensor (any transformers layout), or None."""
    n = llava_name(stored)
    if n.startswith("language_model.model."):
        return "model." + n.removeprefix("language_model.model.")
    if n.startswith("language_model.lm_head."):
        return "lm_head." + n.removeprefix("language_model.lm_head.")
    if n.startswith("language_model."):
        return "model." + n.removeprefix("language_model.")
    if n.startswith("lm_head."):
        return n
    return None


def tokenizer_vocab(src: Path) -> int:
    """Ids the tokenizer can produce: one past the largest id of tokenizer.json."""
    tok = json.loads((src / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1


def main() -> int:
    parsed = source_and_destination(__doc__)
    if parsed is None:
        return 2
    src, dst, config = parsed
    text = dict(config["text_config"])
    vocab = tokenizer_vocab(src)
    if vocab > text["vocab_size"]:
        raise SystemExit(f"the tokenizer has {vocab} ids but the model only {text['vocab_size']}")
    files = sorted(src.glob("*.safetensors"))
    tensors = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for stored in f.keys():
                name = lm_name(stored)
                if name is None:
                    continue
                t = f.get_tensor(stored)
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    t = t[:vocab].contiguous()
                tensors[name] = t
    if "model.embed_tokens.weight" not in tensors:
        raise SystemExit(f"{src}: no language-model embedding found")
    dtype = next(iter(tensors.values())).dtype
    text.update(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
    )
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(text, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    print(f"{dst}: {len(tensors)} tensors ({dtype}), vocabulary {vocab} of {config['text_config']['vocab_size']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
