#!/usr/bin/env python3
"""LoRA training oracle: peft on the tiny llava15-default fixture, from a saved adapter.

Run by hand (never in CI), from the repo root, after tools/make_model_fixtures.py and
tools/make_train_fixtures.py (it reads that script's batch and pixel values):

    /work/venv/bin/python tools/make_lora_train_fixture.py

Writes tests/fixtures/lora-train/ (rewritten each run, deterministic):
- adapter/: a peft adapter (`save_pretrained`) over LlavaForConditionalGeneration: r 4,
  alpha 8, dropout 0, every linear of the language model (as LLaVA's find_all_linear_names),
  the projector as modules_to_save. lora_A keeps peft's init, lora_B and the saved projector are
  seeded noise, so that the adapter changes the loss and a loader that dropped either would show.
- expected.safetensors: the gradients of a few lora_A, lora_B and projector tensors after one
  backward pass on the fixture batch of tests/fixtures/train/.
- expected.json: the step-1 loss, the gradient names (ours, canonical) and the losses of 5 AdamW
  steps, the LoRA pairs at LR and the projector at its own PROJECTOR_LR (two parameter groups, as
  LLaVA's trainer makes for --mm_projector_lr), constant lr, no clipping.

`--bf16` (after a plain run) writes only tests/fixtures/lora-train/bf16.json: the same 5 steps
from the saved adapter under `torch.autocast("cpu", dtype=torch.bfloat16)` over f32 parameters
(the HF Trainer's `bf16=True`): bf16 products, f32 master weights and AdamW moments.

`--check OUT IMAGE QUESTION LLAVA_JSON` (the round trip, run by hand): loads `OUT`, an adapter
that `llava train --lora` wrote over this fixture model, with
PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(MODEL), OUT), and
compares its greedy tokens for QUESTION about IMAGE (llava_v1) with the `token_ids` of
`llava generate --json --template llava_v1 --max-new-tokens 20 --model OUT --model-base MODEL`
saved in LLAVA_JSON.
"""
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests/fixtures/models/llava15-default/model")
TRAIN = os.path.join(ROOT, "tests/fixtures/train")
OUT = os.path.join(ROOT, "tests/fixtures/lora-train")
ADAPTER = os.path.join(OUT, "adapter")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT = "base_model.model.model."
GRADS = {
    # ours (canonical) -> peft's parameter name
    "language_model.layers.0.self_attn.q_proj.lora_A.weight":
        PEFT + "language_model.layers.0.self_attn.q_proj.lora_A.default.weight",
    "language_model.layers.0.self_attn.q_proj.lora_B.weight":
        PEFT + "language_model.layers.0.self_attn.q_proj.lora_B.default.weight",
    "language_model.layers.1.mlp.down_proj.lora_A.weight":
        PEFT + "language_model.layers.1.mlp.down_proj.lora_A.default.weight",
    "language_model.layers.1.mlp.down_proj.lora_B.weight":
        PEFT + "language_model.layers.1.mlp.down_proj.lora_B.default.weight",
    "multi_modal_projector.linear_1.weight":
        PEFT + "multi_modal_projector.modules_to_save.default.linear_1.weight",
    "multi_modal_projector.linear_2.bias":
        PEFT + "multi_modal_projector.modules_to_save.default.linear_2.bias",
}
R, ALPHA, STEPS, LR, PROJECTOR_LR = 4, 8, 5, 1e-3, 2e-4


def base_model():
    return LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()


def make_adapter():
    torch.manual_seed(0)
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0,
        target_modules=".*language_model.*\\.(" + "|".join(TARGETS) + ")",
        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    model = get_peft_model(base_model(), config)
    g = torch.Generator().manual_seed(27)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif ".modules_to_save.default." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(ADAPTER)
    os.remove(os.path.join(ADAPTER, "README.md"))  # peft's model-card template


def inputs():
    batch = json.load(open(os.path.join(TRAIN, "batch.json")))
    pixels = load_file(os.path.join(TRAIN, "expected.safetensors"))["pixel_values"]
    return {
        "input_ids": torch.tensor(batch["input_ids"]),
        "attention_mask": torch.tensor(batch["attention_mask"]),
        "labels": torch.tensor(batch["labels"]),
        "pixel_values": pixels,
    }


def trained():
    return PeftModel.from_pretrained(base_model(), ADAPTER, is_trainable=True)


def five_steps(x, bf16=False):
    """The losses of STEPS AdamW steps from the saved adapter, the pairs at LR and the projector
    at PROJECTOR_LR; with `bf16`, each forward under autocast."""
    model = trained()
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    projector = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    opt = torch.optim.AdamW([{"params": lora, "lr": LR}, {"params": projector, "lr": PROJECTOR_LR}],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    import make_train_fixtures as tf
    assert tf.STEPS == STEPS
    return tf.adamw_losses(model, opt, x, bf16)


def main_bf16():
    losses = five_steps(inputs(), bf16=True)
    with open(os.path.join(OUT, "bf16.json"), "w") as f:
        json.dump({
            "versions": {"transformers": __import__("transformers").__version__,
                         "peft": __import__("peft").__version__, "torch": torch.__version__},
            "precision": "torch.autocast(cpu, bfloat16) over f32 parameters; f32 AdamW",
            "optimizer": {"name": "AdamW", "lr": LR, "projector_lr": PROJECTOR_LR, "betas": [0.9, 0.999],
                          "eps": 1e-8, "weight_decay": 0.0, "schedule": "constant", "steps": STEPS},
            "losses": losses,
        }, f, indent=1)
    print(f"bf16 losses {['%.5f' % l for l in losses]}")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    make_adapter()
    x = inputs()

    model = trained()
    loss = model(**x).loss
    loss.backward()
    params = dict(model.named_parameters())
    grads = {ours: params[theirs].grad.detach().clone().contiguous() for ours, theirs in GRADS.items()}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)

    losses = five_steps(x)

    save_file({f"grad.{k}": v for k, v in grads.items()}, os.path.join(OUT, "expected.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({
            "versions": {"transformers": __import__("transformers").__version__,
                         "peft": __import__("peft").__version__, "torch": torch.__version__},
            "model": "tests/fixtures/models/llava15-default/model",
            "batch": "tests/fixtures/train/batch.json",
            "adapter": {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "targets": TARGETS},
            "trainable_tensors": len(trainable),
            "loss": losses[0],
            "grads": list(GRADS),
            "optimizer": {"name": "AdamW", "lr": LR, "projector_lr": PROJECTOR_LR, "betas": [0.9, 0.999],
                          "eps": 1e-8, "weight_decay": 0.0, "schedule": "constant", "steps": STEPS},
            "losses": losses,
        }, f, indent=1)
    print(f"loss {losses[0]:.6f} (step-1 backward {loss.item():.6f}); {len(trainable)} trainable tensors; "
          f"losses {['%.5f' % l for l in losses]}")


def check(out, image, question, llava_json):
    """Greedy tokens of PeftModel over the base for the llava_v1 prompt `llava generate --json
    --template llava_v1 --max-new-tokens 20` answered, compared with its `token_ids`."""
    from PIL import Image
    from tokenizers import Tokenizer
    import make_train_fixtures as tf
    ours = json.load(open(llava_json))
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    text = f"{tf.SYSTEM} USER: " + "<image>" * 25 + f"\n{question} ASSISTANT:"
    ids = torch.tensor([tok.encode(text).ids])
    assert ids.shape[1] == ours["prompt_tokens"], (ids.shape, ours["prompt_tokens"])
    model = PeftModel.from_pretrained(base_model(), out).eval()
    pixels = tf.slow_processor()(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=20, do_sample=False)
    # Both stop at </s> (id 2); transformers stops without returning it, llava returns it.
    theirs = [t for t in gen[0, ids.shape[1]:].tolist() if t != 2]
    mine = [t for t in ours["token_ids"] if t != 2]
    print(json.dumps({"peft": theirs, "llava": mine, "same": theirs == mine}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if len(sys.argv) == 6 and sys.argv[1] == "--check":
        check(*sys.argv[2:])
    elif sys.argv[1:] == ["--bf16"]:
        main_bf16()
    else:
        main()
