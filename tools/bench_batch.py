#!/usr/bin/env python3
"""The peer side of BENCHMARKS.md's batch-answering figures: the prompts `llava eval answer`
asks, answered by transformers one at a time and then as one left-padded batch.

Same checkpoint (from `llava init`), same rendered prompts ("USER: <image>\\n{question}
ASSISTANT:", the checkpoint's chat template), ids from its tokenizer.json through the
`tokenizers` library as the Rust side makes them, greedy, EOS ignored. Prints one JSON object:
the wall time of each way (model loading excluded), peak RSS, and whether every batched row
gave the tokens it gives alone.

    /work/venv/bin/python tools/bench_batch.py --model /tmp/llava-tiny-1b --questions q.jsonl \
        --image-folder tests/fixtures/models/images --threads 2 --max-new-tokens 32
"""
import argparse
import json
import resource
import time

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--questions", required=True)
    ap.add_argument("--image-folder", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # EOS ignored, as `--ignore-eos`
    cfg = model.config
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    try:
        proc = CLIPImageProcessor.from_pretrained(args.model)
    except Exception:  # transformers without torchvision: the PIL class
        from transformers.models.clip.image_processing_clip import CLIPImageProcessor as Slow
        proc = Slow.from_pretrained(args.model)
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    questions = [json.loads(line) for line in open(args.questions) if line.strip()]
    ids, images = [], []
    for q in questions:
        prompt = f"USER: <image>\n{q['text']} ASSISTANT:"
        ids.append(tok.encode(prompt.replace("<image>", "<image>" * n_img)).ids)
        images.append(Image.open(f"{args.image_folder}/{q['image']}").convert("RGB"))
    pixel_values = proc(images=images, return_tensors="pt")["pixel_values"].to(dtype)
    pad = 0
    gen = dict(do_sample=False, max_new_tokens=args.max_new_tokens,
               min_new_tokens=args.max_new_tokens, pad_token_id=pad)

    with torch.inference_mode():
        t0 = time.perf_counter()
        alone = []
        for i, row in enumerate(ids):
            out = model.generate(input_ids=torch.tensor([row]), pixel_values=pixel_values[i:i + 1],
                                 attention_mask=torch.ones(1, len(row), dtype=torch.long), **gen)
            alone.append(out[0, len(row):].tolist())
        t1 = time.perf_counter()
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, **gen)
        batched = [out[i, width:].tolist() for i in range(len(ids))]
        t2 = time.perf_counter()
    print(json.dumps({
        "peer": f"transformers {__import__('transformers').__version__} / torch {torch.__version__}",
        "dtype": args.dtype, "threads": args.threads, "questions": len(ids),
        "prompt_tokens": [len(r) for r in ids],
        "one_at_a_time_s": round(t1 - t0, 2), "batched_s": round(t2 - t1, 2),
        "batched_rows_same_as_alone": batched == alone,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024, 2),
    }))


if __name__ == "__main__":
    main()
