#!/usr/bin/env python3
"""The peer side of the training benchmark: one stage-2 step in PyTorch on the same checkpoint and batch.

The batch comes from `llava data preview --json` (our tokenisation and mask, so both sides train
on the same ids and labels), repeated to --batch rows; the image is preprocessed by transformers'
PIL CLIP processor. Vision tower frozen; projector + language model train with AdamW. With
`--lora R`, peft's LoRA (alpha 2R, dropout 0.05) on every linear of the language model and the
projector as modules_to_save train instead, as `llava train --lora --lora-r R --lora-alpha 2R`.
With `--bf16`, each forward runs under `torch.autocast(dtype=torch.bfloat16)` over the f32
parameters (the HF Trainer's `bf16=True`), as `llava train --bf16`. With `--base-dtype bf16` the
model is loaded in bf16 (the frozen base takes half the memory; peft keeps the LoRA weights in
f32), as the original LLaVA loads it under `--bf16`; `--gradient-checkpointing` recomputes each
decoder layer in backward; without `--image` the sample is text only; `--max-length` cuts it.

    llava data preview --model /tmp/train-bench --data /tmp/tb/data.json --template plain --json > /tmp/tb/sample.json
    /work/venv/bin/python tools/bench_train_pytorch.py --model /tmp/train-bench --sample /tmp/tb/sample.json \
        --image /tmp/tb/shapes_64x48.png --batch 4 --steps 4 --threads 2
"""
import argparse
import json
import resource
import time

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

try:
    from transformers import CLIPImageProcessorPil as SlowCLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor as SlowCLIPImageProcessor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sample", required=True)
    ap.add_argument("--image", help="the sample's image (none: a text-only sample)")
    ap.add_argument("--max-length", type=int, default=0, help="cut the sample to this many tokens")
    ap.add_argument("--base-dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--bf16", action="store_true", help="autocast-bf16 over f32 parameters")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sample = json.load(open(args.sample))
    cut = args.max_length or len(sample["input_ids"])
    ids = torch.tensor([sample["input_ids"][:cut]] * args.batch)
    labels = torch.tensor([sample["labels"][:cut]] * args.batch)
    dev = torch.device(args.device)
    pixels = None
    if args.image:
        proc = SlowCLIPImageProcessor.from_pretrained(args.model)
        pixels = proc(images=Image.open(args.image).convert("RGB"), return_tensors="pt")["pixel_values"]
        pixels = pixels.repeat(args.batch, 1, 1, 1).to(dev)
    ids, labels = ids.to(dev), labels.to(dev)

    dtype = torch.bfloat16 if args.base_dtype == "bf16" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(dev)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for name, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    if args.lora:
        from peft import LoraConfig, get_peft_model
        targets = "|".join(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.05,
            target_modules=f".*language_model.*\\.({targets})",
            modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM"))
        model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    tokens = ids.numel()
    steady = times[1:] or times
    print(json.dumps({
        "peer": f"transformers {__import__('transformers').__version__} / torch {torch.__version__}"
                + (f" / peft {__import__('peft').__version__} LoRA r {args.lora}" if args.lora else "")
                + (" / autocast bf16" if args.bf16 else "")
                + (" / bf16 base" if args.base_dtype == "bf16" else "")
                + (" / gradient checkpointing" if args.gradient_checkpointing else ""),
        "threads": args.threads, "tokens_per_step": tokens,
        "step_s": [round(t, 3) for t in times], "losses": losses,
        "tokens_per_s": tokens / (sum(steady) / len(steady)),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024, 2),
    }))


if __name__ == "__main__":
    main()
