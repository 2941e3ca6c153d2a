"""Writes the original-layout fixture again as PyTorch `.bin` files, the way the original LLaVA
checkpoints (liuhaotian/llava-v1.5-*) and OpenAI's CLIP ship on the hub:

  tests/fixtures/models/original-layout/model-bin: the same weights as model/, in two shards
      (pytorch_model-0000N-of-00002.bin) with pytorch_model.bin.index.json;
  tests/fixtures/models/original-layout/clip-bin: clip/ as one pytorch_model.bin.

And a projector in the original's own file format, the `mm_projector.bin` that its stage-1 runs
write and its pretrained-projector releases ship (`model.mm_projector.0.*`, `.2.*`):

  tests/fixtures/models/llava15-default/mm_projector.bin: that model's projector, every value
      halved (exact in binary), so that a run that loads it differs from one that does not.

The tensors are those of the safetensors fixture, so the test checks the .bin checkpoint against
the same transformers outputs (expected.json / expected.safetensors). Run by hand:

  python tools/make_bin_fixtures.py
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent / "tests/fixtures/models/original-layout"


def convert(src: Path, dst: Path, shards: int) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    names = sorted(tensors)
    if shards == 1:
        torch.save({n: tensors[n] for n in names}, dst / "pytorch_model.bin")
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i * per:(i + 1) * per]
        torch.save({n: tensors[n] for n in part}, dst / file)
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def original_projector(src: Path, dst: Path) -> None:
    tensors = load_file(src / "model.safetensors")
    index = {"linear_1": 0, "linear_2": 2}
    out = {}
    for name, t in tensors.items():
        if name.startswith("multi_modal_projector."):
            _, linear, kind = name.split(".")
            out[f"model.mm_projector.{index[linear]}.{kind}"] = t * 0.5
    torch.save(out, dst)


convert(ROOT / "model", ROOT / "model-bin", shards=2)
original_projector(
    ROOT.parent / "llava15-default/model", ROOT.parent / "llava15-default/mm_projector.bin"
)
convert(ROOT / "clip", ROOT / "clip-bin", shards=1)
print("wrote", ROOT / "model-bin", ROOT / "clip-bin", "and llava15-default/mm_projector.bin")
