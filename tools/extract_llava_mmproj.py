"""Writes a LLaVA checkpoint's vision tower and projector in the form llama.cpp's legacy
LLaVA-1.5 converter reads (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py with
--clip-model-is-vision --llava-projector): a CLIPVisionModel folder (config.json,
model.safetensors) and a `llava.projector` file (torch.save of the projector's two linears
under the original LLaVA's names, model.mm_projector.0 and .2, as its llava_surgery.py writes).
Used by tools/build_llamacpp.sh for the mmproj GGUF.

    python tools/extract_llava_mmproj.py /tmp/llava-tiny-1b /tmp/llamacpp/clip-hf
"""

import json
import sys

import torch
from llava_checkpoint import llava_name, source_and_destination
from safetensors import safe_open
from safetensors.torch import save_file

# llava-hf's projector names, and the original LLaVA's (nn.Sequential: linear, GELU, linear).
PROJECTOR = {
    "multi_modal_projector.linear_1.": "model.mm_projector.0.",
    "multi_modal_projector.linear_2.": "model.mm_projector.2.",
}


def main() -> int:
    parsed = source_and_destination(__doc__)
    if parsed is None:
        return 2
    src, dst, config = parsed
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise SystemExit("llama.cpp's LLaVA-1.5 encoder drops the CLS feature: strategy 'default' only")
    if config.get("vision_feature_layer", -2) != -2:
        raise SystemExit("llama.cpp's LLaVA-1.5 encoder reads the second-to-last layer: vision_feature_layer -2 only")
    vision, projector = {}, {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for stored in f.keys():
                name = llava_name(stored)
                if name.startswith("vision_tower."):
                    vision[name.removeprefix("vision_tower.")] = f.get_tensor(stored).float()
                for ours, theirs in PROJECTOR.items():
                    if name.startswith(ours):
                        projector[theirs + name.removeprefix(ours)] = f.get_tensor(stored).float()
    if not vision or len(projector) != 4:
        raise SystemExit(f"{src}: no vision tower, or not a two-linear projector with biases")
    dst.mkdir(parents=True, exist_ok=True)
    vision_config = dict(config["vision_config"])
    vision_config["architectures"] = ["CLIPVisionModel"]
    (dst / "config.json").write_text(json.dumps(vision_config, indent=2))
    save_file(vision, dst / "model.safetensors", metadata={"format": "pt"})
    torch.save(projector, dst / "llava.projector")
    print(f"wrote {len(vision)} vision tensors and the projector to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
