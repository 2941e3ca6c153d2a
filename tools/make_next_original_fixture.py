#!/usr/bin/env python3
"""Make the LLaVA-1.6 fixture in the original layout (liuhaotian/llava-v1.6-*) and record what the
original computes.

Run by hand (never in CI), from the repo root, after tools/make_next_fixture.py:

    /work/venv/bin/python tools/make_next_original_fixture.py

It writes tests/fixtures/models/llava-next-original/ from the llava-next fixture's weights, as the
original releases ship them: `model/` (a LLaMA checkpoint with `model.mm_projector.*` and
`model.image_newline`, config.json with `image_aspect_ratio: anyres`, `mm_patch_merge_type:
spatial_unpad` and `image_grid_pinpoints`, the tokenizer without `<image>`) and `clip/` (the
tower as a CLIPVisionModel with its CLIP processor).

The original's geometry differs from transformers' in two places, which is what this fixture is
for:
- its `image_grid_pinpoints` are (width, height), transformers' (height, width). The list written
  here is the llava-next fixture's with each pair swapped, so the two read the same grids; the
  second image (24x20) fits two grids equally well, and only the first in list order is right;
- its unpadding truncates `original * scale` where transformers first rounds to 7 decimals (no
  image here falls between the two).

transformers has no original-layout LLaVA-1.6, so, as the original's `model_vqa.py` does, the
script renders llava_v1, tokenises around `<image>` (`tokenizer_image_token`, -200 per image),
and splices each image's packed features (transformers' LlavaNext `get_image_features` on the
same weights and pixels) in at its marker, then runs the language model on the embeddings.
"""

from __future__ import annotations

import json
import shutil

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers.image_processing_utils import select_best_resolution
from transformers import CLIPVisionModel, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil

import make_model_fixtures as base
import make_next_fixture as nxt

SRC = base.OUT / "llava-next"
OUT = base.OUT / "llava-next-original"
IMAGES = ["tall_40x60.png", "small_24x20.png"]
QUESTION = "What is different between the two pictures?"


def make_small_image() -> None:
    path = base.OUT / "images" / "small_24x20.png"
    if path.exists():
        return
    im = Image.new("RGB", (24, 20), (20, 60, 160))
    for x in range(24):
        for y in range(20):
            if (x // 4 + y // 5) % 2:
                im.putpixel((x, y), (230, 200 - 8 * y, 10 * x))
    im.save(path)


def sliced_model(hf, vocab: int):
    """The llava-next model with the base vocabulary (the original has no <image>/<pad> rows)."""
    cfg = LlavaNextConfig.from_dict(hf.config.to_dict())
    cfg.text_config.vocab_size = vocab
    cfg.text_config.pad_token_id = 0  # the original's <unk>
    cfg.image_token_index = vocab  # unused: features are spliced in by position
    model = LlavaNextForConditionalGeneration(cfg).eval()
    src = hf.state_dict()
    sd = {k: (src[k][:vocab] if src[k].shape != v.shape else src[k]).clone()
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    return model


@torch.no_grad()
def main() -> None:
    make_small_image()
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(SRC / "model"), dtype=torch.float32).eval()
    vocab, merges = base.build_base_tokenizer()
    tok = base.make_tokenizer(vocab, merges, with_image_tokens=False, pad_token="<unk>")
    model = sliced_model(hf, len(vocab))

    prompt = base.SYSTEM_PROMPT + " USER: " + "<image>\n" * len(IMAGES) + QUESTION + " ASSISTANT:"
    input_ids, chunks = base.tokenizer_image_token(prompt, tok)
    images = [Image.open(base.OUT / "images" / n).convert("RGB") for n in IMAGES]
    processor = LlavaNextImageProcessorPil.from_pretrained(str(SRC / "model"))
    inputs = processor(images=images, return_tensors="pt")
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                           image_sizes=inputs["image_sizes"]).pooler_output
    emb = model.get_input_embeddings()
    pieces, start = [], 0
    markers = [i for i, t in enumerate(input_ids) if t == base.IMAGE_TOKEN_INDEX]
    for marker, f in zip(markers, feats):
        pieces += [emb(torch.tensor([input_ids[start:marker]])), f[None]]
        start = marker + 1
    pieces.append(emb(torch.tensor([input_ids[start:]])))
    embeds = torch.cat(pieces, dim=1)
    am = torch.ones(embeds.shape[:2], dtype=torch.long)
    last = model(inputs_embeds=embeds, attention_mask=am, use_cache=False).logits[0, -1]
    tokens, margins, _ = base.greedy(model, dict(inputs_embeds=embeds), am)
    problem = base.check_greedy(tokens, margins, len(vocab), "llava-next-original")
    if problem:
        raise SystemExit(problem)
    # The swapped list is what makes the small image's grid the original's: read unswapped (as
    # transformers reads its own list), it would tile 2x1 instead of 1x2.
    swapped = [[w, h] for h, w in nxt.PINPOINTS]
    small = (images[1].height, images[1].width)
    assert select_best_resolution(small, nxt.PINPOINTS) != select_best_resolution(small, swapped)

    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "model").mkdir(parents=True)
    # As openai/clip-vit-large-patch14-336 ships: a CLIPVisionModel's names (transformers 5 keeps
    # LLaVA-NeXT's tower without the `vision_model.` level).
    (OUT / "clip").mkdir()
    tower = model.model.vision_tower.state_dict()
    save_file({("" if k.startswith("vision_model.") else "vision_model.") + k: v.contiguous()
               for k, v in tower.items()}, str(OUT / "clip" / "model.safetensors"), metadata={"format": "pt"})
    model.config.vision_config.save_pretrained(str(OUT / "clip"))
    clip = CLIPVisionModel.from_pretrained(str(OUT / "clip")).eval()
    hs = clip(inputs["pixel_values"][0, :1], output_hidden_states=True).hidden_states
    ref = model.model.vision_tower(inputs["pixel_values"][0, :1], output_hidden_states=True).hidden_states
    assert torch.equal(hs[-2], ref[-2]), "the written CLIP directory is not the tower"
    base.make_image_processor().save_pretrained(str(OUT / "clip"))
    tok.save_pretrained(str(OUT / "model"))
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.vision_tower."):
            continue
        if k.startswith("model.multi_modal_projector.linear_"):
            n, leaf = k[len("model.multi_modal_projector.linear_"):].split(".")
            k = f"model.mm_projector.{2 * (int(n) - 1)}.{leaf}"
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        sd[k] = v.contiguous()
    assert "model.image_newline" in sd and "lm_head.weight" in sd
    save_file(sd, str(OUT / "model" / "model.safetensors"), metadata={"format": "pt"})
    t = model.config.text_config
    ocfg = json.loads((base.OUT / "original-layout" / "model" / "config.json").read_text())
    ocfg.update({
        "_name_or_path": "./checkpoints/llava-v1.6-tiny",
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": swapped,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "vocab_size": len(vocab),
    })
    base.write_json(OUT / "model" / "config.json", ocfg)

    tensors = {"last_logits": last}
    exp = {
        "case": "llava-next-original",
        "versions": base.versions(),
        "weights_from": "llava-next (identical tensors; embed_tokens/lm_head rows 0..599)",
        "images": IMAGES,
        "image_sizes": inputs["image_sizes"].tolist(),
        "image_tokens": [int(f.shape[0]) for f in feats],
        "conv_template": "llava_v1",
        "question": QUESTION,
        "prompt": prompt,
        "image_token_index": base.IMAGE_TOKEN_INDEX,
        "input_ids": input_ids,
        "greedy_tokens": tokens,
        "greedy_margins": margins,
        "greedy_text": tok.decode(tokens),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    base.save_tensors(OUT / "expected.safetensors", tensors)
    base.write_json(OUT / "expected.json", exp)
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"llava-next-original: image tokens {exp['image_tokens']}, greedy {tokens} "
          f"(min margin {min(margins):.4f}), {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
