#!/usr/bin/env python3
"""Make the LLaVA v0 fixture (`mm_use_im_start_end`) and record what the original computes.

Run by hand (never in CI), from the repo root, after tools/make_model_fixtures.py:

    /work/venv/bin/python tools/make_v0_fixture.py

It writes tests/fixtures/models/original-v0/ from the original-layout fixture's weights, dressed
as a v0 release (LLaVA-7b-v0, LLaVA-Lightning):
- config.json with `mm_use_im_start_end: true`, `mm_use_im_patch_token: true`, no
  `mm_projector_type` (so the original's default, one `linear` layer) and no
  `image_aspect_ratio` (so resize + center crop);
- the tokenizer with the tokens the original's model builder adds for such a config, in its
  order: `<im_patch>`, then `<im_start>`, `<im_end>` (ids 600, 601, 602), and embedding and
  lm_head rows for them;
- the CLIP tower is the original-layout fixture's `clip/`, not copied.

What the original does at inference (llava/eval/model_vqa.py and llava/mm_utils.py): the question
becomes `<im_start><image><im_end>\\n{q}`, the llava_v0 conversation renders it, and
`tokenizer_image_token` tokenises the prompt in chunks around `<image>`, with -200 where the
image features go. transformers has no LLaVA v0 model, so the script builds that sequence of
embeddings itself (HF's LlavaForConditionalGeneration with the linear projector swapped in, its
vision tower and language model unchanged) and records the logits and 20 greedy tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionModel, LlavaForConditionalGeneration

import make_model_fixtures as base

OUT = base.OUT / "original-v0"
SRC = base.OUT / "original-layout"
QUESTION = "What shapes can you see in the image?"
IMAGE = "shapes_64x48.png"  # not square: resize + center crop
V0_SYSTEM = base.SYSTEM_PROMPT  # conv_llava_v0's system prompt is the same sentence


def v0_prompt(question: str) -> str:
    """conv_llava_v0 (SeparatorStyle.SINGLE, sep '###') with the question as model_vqa.py builds it."""
    qs = "<im_start><image><im_end>\n" + question
    return V0_SYSTEM + "###" + "Human: " + qs + "###" + "Assistant:"


def build_model(seed: int):
    """The original-layout model plus three embedding/lm_head rows and a seeded linear projector."""
    ocfg = json.loads((SRC / "model" / "config.json").read_text())
    vocab = ocfg["vocab_size"] + 3
    cfg = base.make_config(vocab, vocab, 0, ocfg["num_key_value_heads"], "default", -2)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    llm = load_file(str(SRC / "model" / "model.safetensors"))
    sd = {}
    for k, v in llm.items():
        if k.startswith("model.mm_projector."):
            continue
        if k == "model.embed_tokens.weight":
            v = torch.cat([v, torch.randn((3, v.shape[1]), generator=g)])
        elif k == "lm_head.weight":
            v = torch.cat([v, 4.0 * torch.randn((3, v.shape[1]), generator=g) / v.shape[1] ** 0.5])
        sd[k] = v
    hf = {}
    for k, v in sd.items():
        hf[k if k == "lm_head.weight" else "model.language_model." + k[len("model."):]] = v
    clip = load_file(str(SRC / "clip" / "model.safetensors"))
    for k, v in clip.items():
        hf["model.vision_tower." + k[len("vision_model."):]] = v
    missing = [k for k in model.state_dict() if k not in hf and "multi_modal_projector" not in k]
    assert not missing, missing
    model.load_state_dict(hf, strict=False)
    # v0's projector: one nn.Linear(mm_hidden_size, hidden_size).
    proj = torch.nn.Linear(cfg.vision_config.hidden_size, cfg.text_config.hidden_size)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) / proj.in_features ** 0.5)
        proj.bias.copy_(0.1 * torch.randn(proj.bias.shape, generator=g))
    model.model.multi_modal_projector = proj
    sd["model.mm_projector.weight"] = proj.weight.detach().clone()
    sd["model.mm_projector.bias"] = proj.bias.detach().clone()
    return model, ocfg, sd


def make_tokenizer():
    """model/builder.py: add_tokens([<im_patch>]) under mm_use_im_patch_token, then
    add_tokens([<im_start>, <im_end>]) under mm_use_im_start_end, both special."""
    tok = AutoTokenizer.from_pretrained(str(SRC / "model"))
    n = len(tok)
    tok.add_tokens(["<im_patch>"], special_tokens=True)
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    ids = tok.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"])
    assert ids == [n, n + 1, n + 2], ids
    return tok


@torch.no_grad()
def forward(model, tok):
    prompt = v0_prompt(QUESTION)
    input_ids, chunks = base.tokenizer_image_token(prompt, tok)
    marker = input_ids.index(base.IMAGE_TOKEN_INDEX)
    start, end = tok.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    assert input_ids[marker - 1] == start and input_ids[marker + 1] == end, input_ids
    image = base.load_image(base.OUT / "images" / IMAGE, "none")
    pixel_values = base.make_image_processor()(images=image, return_tensors="pt")["pixel_values"]
    feats = base.manual_image_features(model, pixel_values, -2, "default")[0]
    emb = model.get_input_embeddings()
    embeds = torch.cat([emb(torch.tensor([input_ids[:marker]])), feats[None],
                        emb(torch.tensor([input_ids[marker + 1:]]))], dim=1)
    am = torch.ones(embeds.shape[:2], dtype=torch.long)
    out = model(inputs_embeds=embeds, attention_mask=am, use_cache=False)
    tokens, margins, _ = base.greedy(model, dict(inputs_embeds=embeds), am)
    return dict(prompt=prompt, input_ids=input_ids, chunks=chunks, marker=marker,
                pixel_values=pixel_values, feats=feats, out=out, tokens=tokens, margins=margins,
                seq_len=int(embeds.shape[1]))


def main() -> None:
    tok = make_tokenizer()
    for seed in range(4000, 4100):
        model, ocfg, sd = build_model(seed)
        r = forward(model, tok)
        # The new rows must not win the greedy choice: a v0 model never emits its image tokens.
        problem = base.check_greedy(r["tokens"], r["margins"], ocfg["vocab_size"], "original-v0")
        if problem is None:
            break
        print(f"seed {seed}: {problem}")
    else:
        raise SystemExit("no seed gave clear greedy margins")

    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "model").mkdir(parents=True)
    tok.save_pretrained(str(OUT / "model"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(OUT / "model" / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = {k: v for k, v in ocfg.items() if k not in ("mm_projector_type", "image_aspect_ratio",
                                                     "mm_patch_merge_type", "mm_projector_lr")}
    cfg.update({
        "_name_or_path": "./checkpoints/llava-tiny-v0",
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "sep_image_conv_front": False,
        "vocab_size": ocfg["vocab_size"] + 3,
    })
    base.write_json(OUT / "model" / "config.json", cfg)

    tensors = {"pixel_values": r["pixel_values"], "image_features": r["feats"],
               "last_logits": r["out"].logits[0, -1]}
    exp = {
        "case": "original-v0",
        "versions": base.versions(),
        "seed": seed,
        "weights_from": "original-layout (identical tensors) + 3 seeded embed_tokens/lm_head rows "
                        "for <im_patch>, <im_start>, <im_end> + a seeded linear mm_projector",
        "clip_dir": "../original-layout/clip",
        "image": IMAGE,
        "image_aspect_ratio": "square",
        "conv_template": "llava_v0",
        "question": QUESTION,
        "prompt": r["prompt"],
        "chunks": r["prompt"].split("<image>"),
        "chunk_ids": r["chunks"],
        "image_token_index": base.IMAGE_TOKEN_INDEX,
        "input_ids": r["input_ids"],
        "image_marker_position": r["marker"],
        "num_image_tokens": int(r["feats"].shape[0]),
        "sequence_length": r["seq_len"],
        "note": "the features of the image replace the -200 marker, which sits between <im_start> "
                "and <im_end>: sequence = ids[:marker] + features + ids[marker+1:]",
        "greedy_tokens": r["tokens"],
        "greedy_margins": r["margins"],
        "greedy_min_margin": min(r["margins"]),
        "greedy_text": tok.decode(r["tokens"]),
    }
    exp["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    base.save_tensors(OUT / "expected.safetensors", tensors)
    base.write_json(OUT / "expected.json", exp)

    # What the Rust side loads must tokenise like transformers: tokenizer.json, chunk by chunk.
    from tokenizers import Tokenizer as RawTokenizer
    raw = RawTokenizer.from_file(str(OUT / "model" / "tokenizer.json"))
    assert [raw.encode(c).ids for c in exp["chunks"]] == exp["chunk_ids"]
    # The CLIP directory it points at is the one the features came from.
    clip = CLIPVisionModel.from_pretrained(str(SRC / "clip")).eval()
    with torch.no_grad():
        hs = clip(r["pixel_values"], output_hidden_states=True).hidden_states
        again = model.model.multi_modal_projector(hs[-2][:, 1:])[0]
    assert torch.allclose(again, r["feats"], atol=1e-6)
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"original-v0: seed {seed}, min margin {min(r['margins']):.4f}, greedy {r['tokens']}, "
          f"{size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
