#!/usr/bin/env python3
"""The peer side of BENCHMARKS.md: the same generation as `llava generate --json`, in transformers.

Same checkpoint (from `llava init`), same prompt token ids (tokenised with the checkpoint's
tokenizer.json through the `tokenizers` library, as the Rust side does), same image, greedy,
EOS ignored so both sides decode the same number of tokens. Prints one JSON object with
vision_ms, prefill_ms, decode_tok_s and peak RSS.

    /work/venv/bin/python tools/bench_transformers.py --model /tmp/tiny-1b \
        --image tests/fixtures/models/images/shapes_64x48.png --dtype float32 --threads 2
"""
import argparse
import json
import resource
import time

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import (AutoConfig, CLIPImageProcessor, LlavaForConditionalGeneration,
                          LlavaNextForConditionalGeneration)

# With the `llava init` character-level tokenizer the whole prompt is 41 text tokens + 576 image tokens.
QUESTION = "Describe the picture."


def run(model, cfg, pixel_values, input_ids, args, dev, now, image_kwargs):
    with torch.inference_mode():
        t0 = now()
        feats = model.get_image_features(pixel_values=pixel_values,
                                         vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                         **image_kwargs)
        # transformers 5 returns a model output whose pooler_output is a list, one per image.
        if hasattr(feats, "pooler_output"):
            feats = feats.pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), dim=0)
        feats = feats.reshape(-1, feats.shape[-1])
        t1 = now()
        embeds = model.get_input_embeddings()(input_ids.clamp(max=cfg.text_config.vocab_size - 1))
        mask = (input_ids == cfg.image_token_index).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        nxt = out.logits[0, -1].argmax().item()
        t2 = now()
        generated = [nxt]
        for _ in range(args.max_new_tokens - 1):
            out = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[0, -1].argmax().item()
            generated.append(nxt)
        t3 = now()
    return t0, t1, t2, t3, generated


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeat", type=int, default=1, help="runs; the last is reported (GPU warm-up)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt", default=None, help="rendered prompt text; default: the llava-1.5 template")
    ap.add_argument("--int8", action="store_true",
                    help="the language model's linear layers in int8 (torch dynamic quantization, "
                         "the CPU peer of --load-8bit); lm_head stays float")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    # LLaVA-NeXT (tools/make_next_bench.py) tiles the image; its token count depends on its size.
    next_ = AutoConfig.from_pretrained(args.model).model_type == "llava_next"
    cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    model = cls.from_pretrained(args.model, dtype=dtype).to(dev).eval()
    cfg = model.config
    if args.int8:
        lm = model.model.language_model
        torch.ao.quantization.quantize_dynamic(lm, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    prompt = args.prompt or f"USER: <image>\n{QUESTION} ASSISTANT:"
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    if cfg.vision_feature_select_strategy == "full":
        n_img += 1
    image = Image.open(args.image).convert("RGB")
    image_kwargs = {}
    if next_:
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
        proc = LlavaNextImageProcessorPil.from_pretrained(args.model)
        out = proc(images=image, return_tensors="pt")
        pixel_values = out["pixel_values"].to(dev, dtype)
        image_kwargs = {"image_sizes": out["image_sizes"]}
        counter = LlavaNextProcessor.__new__(LlavaNextProcessor)
        counter.image_processor, counter.patch_size = proc, cfg.vision_config.patch_size
        counter.num_additional_image_tokens = 1
        side = cfg.vision_config.image_size
        n_img = counter._get_number_of_features(image.height, image.width, side, side) - 1
    ids = tok.encode(prompt.replace("<image>", "<image>" * n_img)).ids
    input_ids = torch.tensor([ids], device=dev)
    if not next_:
        try:
            proc = CLIPImageProcessor.from_pretrained(args.model)
        except Exception:  # transformers without torchvision: the PIL class
            from transformers.models.clip.image_processing_clip import CLIPImageProcessor as Slow
            proc = Slow.from_pretrained(args.model)
        pixel_values = proc(images=image, return_tensors="pt")["pixel_values"].to(dev, dtype)

    def now():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for _ in range(args.repeat):
        t0, t1, t2, t3, generated = run(model, cfg, pixel_values, input_ids, args, dev, now, image_kwargs)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps({
        "peer": f"transformers {__import__('transformers').__version__} / torch {torch.__version__}",
        "dtype": args.dtype + (" + int8 linears" if args.int8 else ""), "threads": args.threads,
        "prompt_tokens": len(ids),
        "vision_ms": (t1 - t0) * 1000, "prefill_ms": (t2 - t1) * 1000,
        "decode_tok_s": (len(generated) - 1) / (t3 - t2),
        "peak_rss_gb": round(rss_gb, 2), "token_ids": generated,
    }))


if __name__ == "__main__":
    main()
