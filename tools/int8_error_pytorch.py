#!/usr/bin/env python3
"""How far torch's dynamic int8 (the `bench_quantized.sh` peer) moves the tiny LLaVA-1.5
fixture's logits, in the measure crates/llava-model/tests/quantized.rs uses for --load-8bit:
max |logit - f32 logit| at the prompt's last position over the f32 logits' spread, and how
many of the 20 recorded greedy tokens it keeps.

    /work/venv/bin/python tools/int8_error_pytorch.py
"""

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

FIXTURE = Path(__file__).resolve().parent.parent / "tests/fixtures/models/llava15-default"


def main() -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    want = load_file(str(FIXTURE / "expected.safetensors"))["last_logits"].flatten()
    model = AutoModelForImageTextToText.from_pretrained(str(FIXTURE / "model"), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(FIXTURE / "model"), backend="pil")
    torch.ao.quantization.quantize_dynamic(model.model.language_model, {torch.nn.Linear},
                                           dtype=torch.qint8, inplace=True)
    image = Image.open(FIXTURE.parent / "images" / expected["image"]).convert("RGB")
    inputs = processor(images=[image], text=expected["prompt"], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == expected["input_ids"], "prompt ids differ"
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, do_sample=False, max_new_tokens=20, eos_token_id=None,
                             pad_token_id=expected["pad_token_id"])
    spread = float(want.max() - want.min())
    error = float((logits - want).abs().max()) / spread
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    kept = next((i for i, (a, b) in enumerate(zip(tokens, expected["greedy_tokens"])) if a != b), 20)
    print(json.dumps({"logit_error_over_spread": error, "greedy_tokens_kept": kept, "generated": len(tokens)}))


if __name__ == "__main__":
    main()
