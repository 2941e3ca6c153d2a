#!/usr/bin/env python3
"""Checks that HF transformers loads a checkpoint we wrote (`llava train` / `llava init`) and
answers like `llava generate` does: greedy, llava_v1 prompt, same tokenizer.json.

    /work/venv/bin/python tools/check_hf_loads.py OUT_DIR --image IMG --question "What is in the picture?" \
        [--expect "A red circle."]

Exits non-zero when loading fails or the answer differs from --expect.
"""
import argparse
import sys

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import LlavaForConditionalGeneration

try:
    from transformers import CLIPImageProcessorPil as SlowCLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor as SlowCLIPImageProcessor

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--expect")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    n_img += 1 if cfg.vision_feature_select_strategy == "full" else 0
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    prompt = f"{SYSTEM} USER: " + "<image>" * n_img + f"\n{args.question} ASSISTANT:"
    ids = torch.tensor([tok.encode(prompt).ids])
    proc = SlowCLIPImageProcessor.from_pretrained(args.model)
    pixels = proc(images=Image.open(args.image).convert("RGB"), return_tensors="pt")["pixel_values"]
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
    print(answer)
    if args.expect is not None and answer != args.expect:
        print(f"expected {args.expect!r}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
