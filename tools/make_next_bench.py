#!/usr/bin/env python3
"""Dress a `llava init --shape tiny-1b` checkpoint as LLaVA-NeXT, for BENCHMARKS.md.

    /work/venv/bin/python tools/make_next_bench.py /tmp/llava-tiny-1b /tmp/llava-next-1b

The weights are the tiny-1b's (the shards are linked, not copied) plus a seeded
`image_newline`, in its own shard that the index names. config.json becomes a `llava_next`
one with llava-v1.6's grid pinpoints, and the processor LlavaNextImageProcessor.
"""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=False)
    for f in src.iterdir():
        if f.name.endswith(".safetensors") or f.name in ("tokenizer.json", "tokenizer_config.json",
                                                           "chat_template.jinja"):
            os.symlink(f.resolve(), out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
               image_grid_pinpoints=PINPOINTS)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    hidden = cfg["text_config"]["hidden_size"]
    g = torch.Generator().manual_seed(0)
    save_file({"image_newline": torch.randn(hidden, generator=g) / hidden ** 0.5},
              str(out / "newline.safetensors"), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["image_newline"] = "newline.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre.update(image_processor_type="LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS, do_pad=True)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


if __name__ == "__main__":
    main()
