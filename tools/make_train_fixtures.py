#!/usr/bin/env python3
"""Training oracle: loss, gradients and a few AdamW steps in PyTorch on the tiny fixture model.

Run by hand, after tools/make_model_fixtures.py (it reads that script's llava15-default checkpoint):

    /work/venv/bin/python tools/make_train_fixtures.py

Writes tests/fixtures/train/ (rewritten each run, deterministic):
- batch.json: two llava_v1 samples as input_ids / labels / attention_mask (right padding), built
  segment by segment with the checkpoint's tokenizer.json, and the image file of each sample.
- expected.safetensors: pixel_values, and gradients of a few weights after one backward pass.
- expected.json: the step-1 loss, the gradient names, and the per-step losses of 5 AdamW steps for
  stage 1 (projector only) and stage 2 (projector + language model), constant lr.

`--bf16` (after a plain run; it reads batch.json and the pixel values back) writes only
tests/fixtures/train/bf16.json: the same 5-step runs as the HF Trainer's `bf16=True` computes
them, the forward under `torch.autocast("cpu", dtype=torch.bfloat16)` over f32 parameters, so
the products run in bf16 while the master weights, their gradients and AdamW's moments stay f32.
"""
import json
import os
import shutil

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlavaForConditionalGeneration

try:  # transformers 5 names the PIL (slow) processor apart; 4.x has only the one
    from transformers import CLIPImageProcessorPil as SlowCLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor as SlowCLIPImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests/fixtures/models/llava15-default/model")
IMAGES = os.path.join(ROOT, "tests/fixtures/models/images")
OUT = os.path.join(ROOT, "tests/fixtures/train")

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SAMPLES = [
    ("shapes_64x48.png", [("What shapes can you see?", "A red circle and a blue square."),
                          ("Which is on the left?", "The circle is on the left.")]),
    ("tall_40x60.png", [("Describe the image briefly.", "A tall picture with a green triangle.")]),
]
GRADS = {
    # our canonical name -> the module path in transformers 5's LlavaForConditionalGeneration
    "multi_modal_projector.linear_1.weight": "model.multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_2.bias": "model.multi_modal_projector.linear_2.bias",
    "language_model.layers.0.self_attn.q_proj.weight": "model.language_model.layers.0.self_attn.q_proj.weight",
    "language_model.layers.2.mlp.down_proj.weight": "model.language_model.layers.2.mlp.down_proj.weight",
}
STEPS, LR = 5, 1e-3


def slow_processor():
    return SlowCLIPImageProcessor.from_pretrained(MODEL)


def segments(turns, n_img):
    """llava_v1 as segments (text, supervised), the image in front of the first question."""
    segs, prompt = [], SYSTEM + " "
    for i, (q, a) in enumerate(turns):
        q = ("<image>" * n_img + "\n" + q) if i == 0 else q
        prompt += f"USER: {q} ASSISTANT:"
        segs.append((prompt, False))
        segs.append((f" {a}</s>", True))
        prompt = ""
    return segs


def build_batch(tok, pad_id):
    rows = []
    for image, turns in SAMPLES:
        ids, labels = [], []
        for k, (text, supervised) in enumerate(segments(turns, 25)):
            piece = tok.encode(text, add_special_tokens=(k == 0)).ids
            ids += piece
            labels += piece if supervised else [-100] * len(piece)
        rows.append((image, ids, labels))
    width = max(len(r[1]) for r in rows)
    batch = {"images": [], "input_ids": [], "labels": [], "attention_mask": []}
    for image, ids, labels in rows:
        pad = width - len(ids)
        batch["images"].append(image)
        batch["input_ids"].append(ids + [pad_id] * pad)
        batch["labels"].append(labels + [-100] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
    return batch


def run_steps(model, inputs, trainable_prefixes, bf16=False):
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trainable_prefixes))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return adamw_losses(model, opt, inputs, bf16)


def adamw_losses(model, opt, inputs, bf16=False):
    """The losses of STEPS steps of `opt` on `inputs`, each taken before its update; with `bf16`,
    each forward under autocast-bf16 (the HF Trainer's `bf16=True` over f32 parameters)."""
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    return losses


def main():
    torch.manual_seed(0)
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    pad_id = tok.token_to_id("<pad>")
    batch = build_batch(tok, pad_id)
    proc = slow_processor()
    pixel_values = torch.cat([
        proc(images=Image.open(os.path.join(IMAGES, f)).convert("RGB"), return_tensors="pt")["pixel_values"]
        for f in batch["images"]
    ])
    inputs = {
        "input_ids": torch.tensor(batch["input_ids"]),
        "attention_mask": torch.tensor(batch["attention_mask"]),
        "labels": torch.tensor(batch["labels"]),
        "pixel_values": pixel_values,
    }

    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    out = model(**inputs)
    out.loss.backward()
    params = dict(model.named_parameters())
    grads = {ours: params[theirs].grad.detach().clone().contiguous() for ours, theirs in GRADS.items()}
    supervised = sum(1 for row in batch["labels"] for l in row[1:] if l != -100)

    stage1 = run_steps(LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval(),
                       inputs, ["model.multi_modal_projector."])
    stage2 = run_steps(LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval(),
                       inputs, ["model.multi_modal_projector.", "model.language_model.", "lm_head."])

    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    with open(os.path.join(OUT, "batch.json"), "w") as f:
        json.dump(batch, f)
    save_file({"pixel_values": pixel_values.contiguous(), **{f"grad.{k}": v for k, v in grads.items()}},
              os.path.join(OUT, "expected.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({
            "versions": {"transformers": __import__("transformers").__version__, "torch": torch.__version__},
            "model": "tests/fixtures/models/llava15-default/model",
            "loss": out.loss.item(),
            "supervised_tokens": supervised,
            "grads": list(GRADS),
            "optimizer": {"name": "AdamW", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                          "schedule": "constant", "steps": STEPS},
            "stage1_trainable": ["multi_modal_projector"],
            "stage1_losses": stage1,
            "stage2_trainable": ["multi_modal_projector", "language_model", "lm_head"],
            "stage2_losses": stage2,
        }, f, indent=1)
    print(f"loss {out.loss.item():.6f} over {supervised} supervised tokens; "
          f"stage1 {['%.4f' % l for l in stage1]}; stage2 {['%.4f' % l for l in stage2]}")


def main_bf16():
    """The autocast runs of stage 1 and stage 2 on the batch a plain run wrote."""
    from safetensors.torch import load_file
    batch = json.load(open(os.path.join(OUT, "batch.json")))
    inputs = {
        "input_ids": torch.tensor(batch["input_ids"]),
        "attention_mask": torch.tensor(batch["attention_mask"]),
        "labels": torch.tensor(batch["labels"]),
        "pixel_values": load_file(os.path.join(OUT, "expected.safetensors"))["pixel_values"],
    }
    def fresh():
        return LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    stage1 = run_steps(fresh(), inputs, ["model.multi_modal_projector."], bf16=True)
    stage2 = run_steps(fresh(), inputs, ["model.multi_modal_projector.", "model.language_model.", "lm_head."],
                       bf16=True)
    with open(os.path.join(OUT, "bf16.json"), "w") as f:
        json.dump({
            "versions": {"transformers": __import__("transformers").__version__, "torch": torch.__version__},
            "model": "tests/fixtures/models/llava15-default/model",
            "precision": "torch.autocast(cpu, bfloat16) over f32 parameters; f32 AdamW",
            "optimizer": {"name": "AdamW", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                          "schedule": "constant", "steps": STEPS},
            "stage1_losses": stage1,
            "stage2_losses": stage2,
        }, f, indent=1)
    print(f"bf16: stage1 {['%.4f' % l for l in stage1]}; stage2 {['%.4f' % l for l in stage2]}")


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--bf16"]:
        main_bf16()
    else:
        main()
