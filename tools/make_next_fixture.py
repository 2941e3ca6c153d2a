#!/usr/bin/env python3
"""Make a tiny LLaVA-NeXT (1.6, "anyres") checkpoint and record what transformers computes.

Run by hand (never in CI), from the repo root, after tools/make_model_fixtures.py:

    /work/venv/bin/python tools/make_next_fixture.py

It writes tests/fixtures/models/llava-next/, a `LlavaNextForConditionalGeneration` in the
layout llava-hf/llava-v1.6-*-hf ships, at the toy shape of the other fixtures (30 px tiles of
6 px patches, so 25 features a tile). The grid pinpoints are llava-hf's scaled from 336 to 30:
[[30,60],[60,30],[60,60],[90,30],[30,90]] (height, width).

Three images, chosen so that the tiling and the unpadding go every way there is:
- shapes_64x48.png (landscape): the 60x60 grid (2x2 tiles), padding rows cut off;
- tall_40x60.png (portrait): the 60x60 grid, padding columns cut off;
- wide_96x28.png (written here): the 30x90 grid (1x3 tiles), nothing cut off.

What it records, from transformers' PIL processor (LlavaNextImageProcessorPil) and model:
- per image: the tiles' pixel values (`pixel_values_{i}`, `[tiles, 3, 30, 30]`), its (height,
  width), and its number of image tokens;
- the prompt with all three images ("multi"): input ids, the packed image features, the last
  logits and 20 greedy tokens (with the KV cache, checked against `generate()`);
- a prompt with one image ("single", the landscape one): input ids, last logits, greedy tokens.
"""

from __future__ import annotations

import json
import shutil

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tokenizers import Tokenizer as RawTokenizer
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

import make_model_fixtures as base

OUT = base.OUT / "llava-next"
PINPOINTS = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]
IMAGES = ["shapes_64x48.png", "tall_40x60.png", "wide_96x28.png"]
MULTI_QUESTION = "What is shown in the image?"
SINGLE_QUESTION = "Describe the image briefly."


def make_wide_image() -> None:
    path = base.OUT / "images" / "wide_96x28.png"
    if path.exists():
        return
    im = Image.new("RGB", (96, 28), (240, 230, 200))
    d = ImageDraw.Draw(im)
    for i in range(6):
        d.rectangle([4 + 15 * i, 4, 14 + 15 * i, 22], fill=(30 * i, 200 - 25 * i, 90 + 20 * i))
    d.line([(0, 27), (95, 0)], fill=(10, 10, 10), width=2)
    im.save(path)


def make_config(vocab_size: int, image_id: int, pad_id: int) -> LlavaNextConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=base.IMAGE_SIZE, patch_size=base.PATCH_SIZE, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=32, num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=pad_id,
    )
    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image_id,
        image_grid_pinpoints=PINPOINTS, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False,
    )


def make_processor(tokenizer) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        do_resize=True, size={"shortest_edge": base.IMAGE_SIZE}, resample=3,
        do_center_crop=True, crop_size={"height": base.IMAGE_SIZE, "width": base.IMAGE_SIZE},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=base.CLIP_MEAN,
        image_std=base.CLIP_STD, do_convert_rgb=True, do_pad=True, image_grid_pinpoints=PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=base.PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=base.CHAT_TEMPLATE,
    )


def conversation(question: str, n_images: int) -> list:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def run(model, processor, images, question):
    prompt = processor.apply_chat_template(conversation(question, len(images)), add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    tokens, margins, _ = base.greedy(
        model, dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    image_sizes=inputs["image_sizes"]), inputs["attention_mask"])
    return prompt, inputs, tokens, margins


def main() -> None:
    make_wide_image()
    vocab, merges = base.build_base_tokenizer()
    tokenizer = base.make_tokenizer(vocab, merges, with_image_tokens=True, pad_token="<pad>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    cfg = make_config(len(tokenizer), image_id, pad_id)
    processor = make_processor(tokenizer)
    images = [Image.open(base.OUT / "images" / name).convert("RGB") for name in IMAGES]

    for seed in range(5000, 5100):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(cfg).eval()
        base.init_weights(model, seed)
        with torch.no_grad():  # init_weights scales 1-D parameters as biases; this one is an embedding
            model.model.image_newline.copy_(torch.randn(model.model.image_newline.shape,
                                                        generator=torch.Generator().manual_seed(seed)))
        multi = run(model, processor, images, MULTI_QUESTION)
        single = run(model, processor, images[:1], SINGLE_QUESTION)
        problem = (base.check_greedy(multi[2], multi[3], len(vocab), "multi")
                   or base.check_greedy(single[2], single[3], len(vocab), "single"))
        if problem is None:
            break
        print(f"  seed {seed} rejected: {problem}")
    else:
        raise SystemExit("no seed gave clear greedy margins")

    tensors = {}
    per_image = []
    with torch.no_grad():
        _, inputs, _, _ = multi
        sizes = inputs["image_sizes"].tolist()
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                               image_sizes=inputs["image_sizes"]).pooler_output
        for i, (name, f) in enumerate(zip(IMAGES, feats)):
            one = processor.image_processor(images=images[i], return_tensors="pt")
            tiles = one["pixel_values"][0]
            tensors[f"pixel_values_{i}"] = tiles
            per_image.append({"image": name, "image_size": sizes[i], "tiles": int(tiles.shape[0]),
                              "image_tokens": int(f.shape[0])})
        tensors["image_features"] = torch.cat(list(feats), dim=0)
        # The newline row really is in there, and the grids are really unpadded.
        assert sum(p["image_tokens"] for p in per_image) == int((inputs["input_ids"] == image_id).sum())
        # No-cache recompute of the greedy tokens.
        seq = inputs["input_ids"]
        for t in multi[2]:
            o = model(input_ids=seq, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                      use_cache=False)
            assert int(o.logits[0, -1].argmax()) == t, "cache / no-cache greedy disagree"
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=base.N_GREEDY, pad_token_id=pad_id)
        gen_tokens = gen[0, inputs["input_ids"].shape[1]:].tolist()
        assert gen_tokens == multi[2][:len(gen_tokens)], "generate() disagrees with the manual greedy loop"
        tensors["multi_last_logits"] = model(**inputs, use_cache=False).logits[0, -1]
        s_inputs = single[1]
        tensors["single_last_logits"] = model(**s_inputs, use_cache=False).logits[0, -1]

    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "model").mkdir(parents=True)
    model.save_pretrained(str(OUT / "model"))
    processor.save_pretrained(str(OUT / "model"))

    exp = {
        "case": "llava-next",
        "versions": base.versions(),
        "seed": seed,
        "image_grid_pinpoints": PINPOINTS,
        "images": per_image,
        "multi": {"question": MULTI_QUESTION, "prompt": multi[0], "input_ids": multi[1]["input_ids"][0].tolist(),
                  "greedy_tokens": multi[2], "greedy_margins": multi[3], "generate_tokens": gen_tokens,
                  "greedy_text": tokenizer.decode(multi[2])},
        "single": {"question": SINGLE_QUESTION, "image": IMAGES[0], "prompt": single[0],
                   "input_ids": single[1]["input_ids"][0].tolist(), "greedy_tokens": single[2],
                   "greedy_margins": single[3], "greedy_text": tokenizer.decode(single[2])},
        "image_token_id": image_id,
    }
    exp["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    base.save_tensors(OUT / "expected.safetensors", tensors)
    base.write_json(OUT / "expected.json", exp)

    # What was written reloads as it was made, through the PIL processor.
    again = LlavaNextForConditionalGeneration.from_pretrained(str(OUT / "model"), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(OUT / "model"), backend="pil")
    assert "Pil" in type(proc.image_processor).__name__, type(proc.image_processor)
    inputs = proc(images=images, text=multi[0], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == exp["multi"]["input_ids"]
    with torch.no_grad():
        d = float((again(**inputs, use_cache=False).logits[0, -1] - tensors["multi_last_logits"]).abs().max())
    assert d < 1e-5, d
    raw = RawTokenizer.from_file(str(OUT / "model" / "tokenizer.json"))
    counts = iter(p["image_tokens"] for p in per_image)
    expanded = "".join(part if i == 0 else "<image>" * next(counts) + part
                       for i, part in enumerate(multi[0].split("<image>")))
    assert raw.encode(expanded).ids == exp["multi"]["input_ids"], "tokenizer.json and transformers disagree"
    keys = sorted(load_file(str(OUT / "model" / "model.safetensors")).keys())
    assert "image_newline" in keys, keys[:5]  # saved under the hub's (transformers 4) names
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"llava-next: seed {seed}, images {per_image}\n  multi greedy {multi[2]} (min margin "
          f"{min(multi[3]):.4f})\n  single greedy {single[2]} (min margin {min(single[3]):.4f}), {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
