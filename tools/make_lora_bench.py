#!/usr/bin/env python3
"""A LoRA release at a real shape, for timing `llava merge-lora` against peft (BENCHMARKS.md).

Writes under OUT (default /tmp/lorabench), random weights, f16 as the original releases store them:
- base/: a TinyLlama-1.1B-shaped LlamaForCausalLM (as Vicuna's directory is), tokenizer-less;
- clip/: a CLIP ViT-L/14-336-shaped CLIPVisionModel;
- lora/: the original's LoRA release layout: config.json (LlavaLlamaForCausalLM fields),
  adapter_config.json + adapter_model.bin (r 128, alpha 256 on all seven linear layers, as
  LLaVA-1.5's finetune_lora.sh) and non_lora_trainables.bin (the mlp2x_gelu projector).
Then times what the original's merge_lora_weights.py does with peft: load the base, load the
non-LoRA weights, PeftModel.from_pretrained, merge_and_unload, save_pretrained.

    /work/venv/bin/python tools/make_lora_bench.py [OUT]
"""

import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lorabench")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
torch.manual_seed(0)
torch.set_num_threads(2)


def make() -> None:
    lcfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False, torch_dtype="float16")
    base = LlamaForCausalLM(lcfg).to(torch.float16)
    base.save_pretrained(OUT / "base")
    ccfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    CLIPVisionModel(ccfg).to(torch.float16).save_pretrained(OUT / "clip")
    peft = get_peft_model(base, LoraConfig(r=128, lora_alpha=256, target_modules=TARGETS, lora_dropout=0.0,
                                           bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    lora = OUT / "lora"
    peft.save_pretrained(lora, safe_serialization=False)
    (lora / "README.md").unlink(missing_ok=True)
    config = lcfg.to_dict() | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": str(OUT / "clip"), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "_name_or_path": str(OUT / "base"),
    }
    (lora / "config.json").write_text(json.dumps(config, indent=1, default=str))
    projector = {"base_model.model.model.mm_projector.0.weight": torch.randn(2048, 1024).half() / 32,
                 "base_model.model.model.mm_projector.0.bias": torch.zeros(2048).half(),
                 "base_model.model.model.mm_projector.2.weight": torch.randn(2048, 2048).half() / 45,
                 "base_model.model.model.mm_projector.2.bias": torch.zeros(2048).half()}
    torch.save(projector, lora / "non_lora_trainables.bin")


def peer() -> None:
    start = time.time()
    model = LlamaForCausalLM.from_pretrained(OUT / "base", torch_dtype=torch.float16)
    extra = torch.load(OUT / "lora" / "non_lora_trainables.bin")
    model.load_state_dict({k[len("base_model.model."):]: v for k, v in extra.items()}, strict=False)
    model = PeftModel.from_pretrained(model, OUT / "lora").merge_and_unload()
    model.save_pretrained(OUT / "merged-peft")
    print(f"peft merge: {time.time() - start:.1f} s")


if __name__ == "__main__":
    if not (OUT / "lora" / "adapter_model.bin").exists():
        make()
    peer()
