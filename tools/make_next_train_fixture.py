#!/usr/bin/env python3
"""Training oracle for LLaVA-NeXT: loss and gradients in PyTorch on the tiny llava-next fixture.

Run by hand, after tools/make_next_fixture.py (it reads that checkpoint and changes nothing):

    /work/venv/bin/python tools/make_next_train_fixture.py

Two llava_v1 samples about images of different tilings (shapes_64x48.png: 2x2 tiles, rows cut;
tall_40x60.png: 2x2 tiles, columns cut), right-padded into one batch, go through
`LlavaNextForConditionalGeneration` with labels on the answers only. Each image's `<image>`
becomes as many image tokens as the processor gives it. Writes tests/fixtures/train-next/:
- batch.json: the records (as a LLaVA dataset), and the batch's input_ids / labels /
  attention_mask;
- expected.json: the loss, the supervised token count and the gradient names;
- expected.safetensors: the gradients of the projector, `image_newline` and two decoder weights.
"""

import json
import os
import shutil

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

# The same two conversations, system prompt and llava_v1 segments as the LLaVA-1.5 oracle.
from make_train_fixtures import SAMPLES, segments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests/fixtures/models/llava-next/model")
IMAGES = os.path.join(ROOT, "tests/fixtures/models/images")
OUT = os.path.join(ROOT, "tests/fixtures/train-next")

GRADS = {
    # our canonical name -> the parameter in transformers 5's LlavaNextForConditionalGeneration
    "multi_modal_projector.linear_1.weight": "model.multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_2.bias": "model.multi_modal_projector.linear_2.bias",
    "image_newline": "model.image_newline",
    "language_model.layers.0.self_attn.q_proj.weight": "model.language_model.layers.0.self_attn.q_proj.weight",
    "language_model.layers.1.mlp.down_proj.weight": "model.language_model.layers.1.mlp.down_proj.weight",
}


def main():
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(MODEL, backend="pil")
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    image_id = tok.token_to_id("<image>")
    pad_id = tok.token_to_id("<pad>")
    images = [Image.open(os.path.join(IMAGES, name)).convert("RGB") for name, _ in SAMPLES]
    pixels = processor.image_processor(images=images, return_tensors="pt")
    rows = []
    for image, (name, turns) in zip(images, SAMPLES):
        # The processor's own count of this image's tokens.
        one = processor(images=[image], text="<image>", return_tensors="pt")
        n_img = int((one["input_ids"][0] == image_id).sum())
        ids, labels = [], []
        for k, (text, supervised) in enumerate(segments(turns, n_img)):
            piece = tok.encode(text, add_special_tokens=(k == 0)).ids
            ids += piece
            labels += piece if supervised else [-100] * len(piece)
        rows.append((ids, labels, n_img))
    width = max(len(r[0]) for r in rows)
    batch = {"input_ids": [], "labels": [], "attention_mask": [], "image_tokens": []}
    for ids, labels, n_img in rows:
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_id] * pad)
        batch["labels"].append(labels + [-100] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["image_tokens"].append(n_img)
    batch["records"] = [
        {"id": i, "image": name,
         "conversations": [c for q, a in turns for c in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]}
        for i, (name, turns) in enumerate(SAMPLES)
    ]
    batch["records"][0]["conversations"][0]["value"] = "<image>\n" + SAMPLES[0][1][0][0]
    batch["records"][1]["conversations"][0]["value"] = "<image>\n" + SAMPLES[1][1][0][0]

    model = LlavaNextForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                labels=torch.tensor(batch["labels"]), pixel_values=pixels["pixel_values"],
                image_sizes=pixels["image_sizes"])
    out.loss.backward()
    params = dict(model.named_parameters())
    grads = {ours: params[theirs].grad.detach().clone().contiguous() for ours, theirs in GRADS.items()}
    for name, g in grads.items():
        assert float(g.abs().max()) > 0, f"no gradient reaches {name}"
    supervised = sum(1 for row in batch["labels"] for l in row[1:] if l != -100)

    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    with open(os.path.join(OUT, "batch.json"), "w") as f:
        json.dump(batch, f)
    save_file({f"grad.{k}": v for k, v in grads.items()}, os.path.join(OUT, "expected.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({
            "versions": {"transformers": __import__("transformers").__version__, "torch": torch.__version__},
            "model": "tests/fixtures/models/llava-next/model",
            "images": [name for name, _ in SAMPLES],
            "image_sizes": pixels["image_sizes"].tolist(),
            "loss": out.loss.item(),
            "supervised_tokens": supervised,
            "grads": list(GRADS),
        }, f, indent=1)
    print(f"loss {out.loss.item():.6f} over {supervised} supervised tokens; image tokens "
          f"{batch['image_tokens']}; {len(batch['input_ids'][0])} positions")


if __name__ == "__main__":
    main()
