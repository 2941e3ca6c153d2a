#!/usr/bin/env python3
"""Make the LoRA-release fixture (`--model-base`) and record what the merged model computes.

Run by hand (never in CI), from the repo root, after tools/make_model_fixtures.py:

    /work/venv/bin/pip install peft
    /work/venv/bin/python tools/make_lora_fixture.py

The original LLaVA publishes LoRA releases (llava-v1.5-7b-lora): the LLM's low-rank adapters in
peft's format, the projector in `non_lora_trainables.bin`, and the LLaVA config; the user passes
the Vicuna they were trained from as `--model-base`. The original's model builder loads the base,
then the non-LoRA weights, then merges the adapters with peft's `merge_and_unload`.

This writes tests/fixtures/models/original-lora/:
- base/: the original-layout fixture's language model as a plain LlamaForCausalLM checkpoint
  (what a Vicuna directory holds), with its tokenizer;
- lora/: config.json (the original-layout one), adapter_config.json and adapter_model.bin from
  peft (r 4, alpha 8, all seven linear layers of every decoder layer, seeded non-zero A and B),
  and non_lora_trainables.bin with a new seeded projector under the names LLaVA's trainer saves;
- projector-only/: config.json and the same projector as `mm_projector.bin`, the form of a
  stage-1 (pretrain) release; over base/ it is the model without the adapters;
- expected.json / expected.safetensors: the merged model's prompt ids, last logits and 20 greedy
  tokens, computed with transformers as the original-layout case is (the CLIP tower is
  original-layout/clip). The script checks that the adapters and the projector both change the
  greedy tokens, so a loader that dropped either would fail.
"""

from __future__ import annotations

import json
import shutil

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

import make_model_fixtures as base

OUT = base.OUT / "original-lora"
SRC = base.OUT / "original-layout"
QUESTION = "What shapes can you see in the image?"
IMAGE = "shapes_64x48.png"
SEED = 4242
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llava_from(llm_sd: dict, projector: dict, cfg) -> LlavaForConditionalGeneration:
    """HF LLaVA with the given LlamaForCausalLM weights, projector (original names) and the fixture CLIP."""
    model = LlavaForConditionalGeneration(cfg).eval()
    sd = {}
    for k, v in llm_sd.items():
        sd[k if k == "lm_head.weight" else "model.language_model." + k[len("model."):]] = v
    for k, v in projector.items():
        idx, leaf = k[len("model.mm_projector."):].split(".")
        sd[f"model.multi_modal_projector.linear_{1 if idx == '0' else 2}.{leaf}"] = v
    for k, v in load_file(str(SRC / "clip" / "model.safetensors")).items():
        sd["model.vision_tower." + k[len("vision_model."):]] = v
    model.load_state_dict(sd, strict=True)
    return model


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    base_dir, lora_dir = OUT / "base", OUT / "lora"
    base_dir.mkdir(parents=True)
    lora_dir.mkdir()
    ocfg = json.loads((SRC / "model" / "config.json").read_text())
    llm = load_file(str(SRC / "model" / "model.safetensors"))
    old_projector = {k: v for k, v in llm.items() if k.startswith("model.mm_projector.")}
    llm = {k: v for k, v in llm.items() if not k.startswith("model.mm_projector.")}

    # --- base/: a plain LLaMA checkpoint, as Vicuna's directory is
    lcfg = LlamaConfig(
        vocab_size=ocfg["vocab_size"], hidden_size=ocfg["hidden_size"],
        intermediate_size=ocfg["intermediate_size"], num_hidden_layers=ocfg["num_hidden_layers"],
        num_attention_heads=ocfg["num_attention_heads"], num_key_value_heads=ocfg["num_key_value_heads"],
        max_position_embeddings=ocfg["max_position_embeddings"], rms_norm_eps=ocfg["rms_norm_eps"],
        rope_theta=ocfg["rope_theta"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False)
    llama = LlamaForCausalLM(lcfg).eval()
    llama.load_state_dict(llm, strict=True)
    llama.save_pretrained(str(base_dir))
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(SRC / "model" / f, base_dir / f)

    for seed in range(SEED, SEED + 50):
        if attempt(seed, lcfg, llm, old_projector, ocfg, base_dir, lora_dir):
            return
    raise SystemExit("no seed gave clear greedy margins")


def attempt(seed, lcfg, llm, old_projector, ocfg, base_dir, lora_dir) -> bool:
    # --- lora/: peft adapters with seeded, non-zero A and B
    g = torch.Generator().manual_seed(seed)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                          task_type="CAUSAL_LM")
    # The base weights go in before peft wraps the linear layers (as `base_layer`).
    plain = LlamaForCausalLM(lcfg).eval()
    plain.load_state_dict(llm, strict=True)
    peft_model = get_peft_model(plain, peft_cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    peft_model.save_pretrained(str(lora_dir), safe_serialization=False)  # adapter_model.bin, as released
    assert (lora_dir / "adapter_model.bin").is_file()
    (lora_dir / "README.md").unlink(missing_ok=True)  # peft's model card
    shutil.copy(SRC / "model" / "config.json", lora_dir / "config.json")
    new_projector = {k: torch.randn(v.shape, generator=g) / (v.shape[-1] ** 0.5 if v.dim() == 2 else 10.0)
                     for k, v in old_projector.items()}
    torch.save({"base_model.model." + k: v for k, v in new_projector.items()},
               lora_dir / "non_lora_trainables.bin")
    # The same projector as a stage-1 release: config + mm_projector.bin, as pretrain saves it.
    projector_dir = OUT / "projector-only"
    projector_dir.mkdir(exist_ok=True)
    shutil.copy(SRC / "model" / "config.json", projector_dir / "config.json")
    torch.save(new_projector, projector_dir / "mm_projector.bin")

    # --- what the original builder gets: merge_and_unload over the base
    merged = peft_model.merge_and_unload()
    merged_sd = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    assert merged_sd.keys() == llm.keys()
    for k, v in merged_sd.items():  # only the adapted weights moved
        assert torch.equal(v, llm[k]) != any(f".{t}." in k for t in TARGETS), k
    cfg = base.make_config(ocfg["vocab_size"], ocfg["vocab_size"], 0, ocfg["num_key_value_heads"],
                           "default", ocfg["mm_vision_select_layer"])
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    image = base.OUT / "images" / IMAGE
    r = base.original_forward(llava_from(merged_sd, new_projector, cfg), tok, image, QUESTION)
    problem = base.check_greedy(r["tokens"], r["margins"], ocfg["vocab_size"], "original-lora")
    if problem:
        print(f"seed {seed}: {problem}")
        return False
    # Both parts must matter: without the adapters, or with the old projector, the tokens change.
    no_lora = base.original_forward(llava_from(llm, new_projector, cfg), tok, image, QUESTION)
    old_proj = base.original_forward(llava_from(merged_sd, old_projector, cfg), tok, image, QUESTION)
    assert no_lora["tokens"] != r["tokens"], "the adapters do not change the greedy tokens"
    assert old_proj["tokens"] != r["tokens"], "the projector does not change the greedy tokens"

    base.write_json(OUT / "expected.json", {
        "case": "original-lora",
        "versions": base.versions() | {"peft": __import__("peft").__version__},
        "seed": seed,
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": TARGETS},
        "clip_dir": "original-layout/clip",
        "image": IMAGE,
        "image_aspect_ratio": ocfg["image_aspect_ratio"],
        "question": QUESTION,
        "prompt": r["prompt"],
        "input_ids": r["input_ids"],
        "num_image_tokens": int(r["feats"].shape[0]),
        "greedy_tokens": r["tokens"],
        "greedy_margins": r["margins"],
        "greedy_tokens_without_adapters": no_lora["tokens"],
        "note": "merge_and_unload() of peft adapters over base/, projector from non_lora_trainables.bin",
    })
    base.save_tensors(OUT / "expected.safetensors",
                      {"last_logits": r["out"].logits[0, -1], "pixel_values": r["pixel_values"]})
    print("original-lora: seed", seed, "greedy", r["tokens"][:8], "... min margin", min(r["margins"]))
    return True


if __name__ == "__main__":
    main()
