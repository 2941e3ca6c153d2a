"""The PyTorch peer of the demo's stage 0a (BENCHMARKS.md, "The offline demo").

Trains transformers' CLIPVisionModel, shaped as the demo's tower up to the layer LLaVA reads (3
layers, width 128, 64-px pictures in 8-px patches), on the same labels as
`llava_demo::world::patches`: per patch the colour of the object there and the picture's object
count, per object (mean of its patches) its shape and place from the left. Batches of 32 drawn at
random, the loss a sum over tasks (shape times --shape-weight), AdamW, 5% warmup then cosine,
clip 1.0. Prints the loss, held-out accuracy per task (colour on object patches; count per
patch; shape and order per object) and seconds every 200 steps.

    llava demo --out /tmp/demo --stop-after init
    python tools/tower_pytorch.py --world /tmp/demo/world --steps 800 --lr 1e-3 --shape-weight 3
    python tools/tower_pytorch.py --world /tmp/demo/world --steps 600 --init flat   # 0.02 everywhere
    python tools/tower_pytorch.py --world /tmp/demo/world --steps 600 --shape-per-patch

The labels are recomputed here from `scenes_*.jsonl` with the same rules as the Rust code.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
MAX_OBJECTS = 5
STAR = [((1 if i % 2 == 0 else 0.45) * math.cos(math.pi * i / 5 - math.pi / 2),
         (1 if i % 2 == 0 else 0.45) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)]
TRIANGLE = [(0, -1), (1, 0.95), (-1, 0.95)]
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def in_polygon(pts, x, y):
    inside, j = False, len(pts) - 1
    for i, (xi, yi) in enumerate(pts):
        xj, yj = pts[j]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            inside = not inside
        j = i
    return inside


def inside(shape, x, y):
    if shape == "circle":
        return x * x + y * y <= 1
    if shape == "square":
        return abs(x) <= 0.9 and abs(y) <= 0.9
    return in_polygon(TRIANGLE if shape == "triangle" else STAR, x, y)


def owners(scene, grid):
    """The object under each patch (or None), as `patch_objects` decides it."""
    pw = scene["width"] / grid
    owner = [None] * (grid * grid)
    for gy in range(grid):
        for gx in range(grid):
            best = (0.0, None)
            for i, o in enumerate(scene["objects"]):
                hits = sum(inside(o["shape"], ((gx + (sx + 0.5) / 4) * pw - o["cx"]) / o["radius"],
                                  ((gy + (sy + 0.5) / 4) * pw - o["cy"]) / o["radius"])
                           for sx in range(4) for sy in range(4)) / 16
                if hits > best[0]:
                    best = (hits, i)
            if best[0] >= 0.1:
                owner[gy * grid + gx] = best[1]
    for i, o in enumerate(scene["objects"]):
        if i not in owner:
            owner[min(int(o["cy"] / pw), grid - 1) * grid + min(int(o["cx"] / pw), grid - 1)] = i
    return owner


def load(world, split, grid, limit):
    scenes = [json.loads(l) for l in open(f"{world}/scenes_{split}.jsonl")][:limit]
    pixels = np.stack([((np.asarray(Image.open(f"{world}/images/{s['file_name']}").convert("RGB")) / 255.0 - MEAN)
                        / STD).transpose(2, 0, 1) for s in scenes]).astype(np.float32)
    own, colour, count, shape = [], [], [], []
    for s in scenes:
        o = owners(s, grid)
        objs = s["objects"]
        own.append([0 if w is None else w + 1 for w in o])
        colour.append([0 if w is None else COLOURS.index(objs[w]["colour"]) + 1 for w in o])
        count.append([len(objs) - 1] * len(o))
        shape.append([SHAPES.index(x["shape"]) for x in objs] + [-1] * (MAX_OBJECTS - len(objs)))
    t = lambda a: torch.tensor(np.array(a))
    return torch.tensor(pixels), t(own), t(colour), t(count), t(shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", choices=["hf", "flat"], default="hf")
    ap.add_argument("--shape-per-patch", action="store_true", help="ask shape of every patch instead of each object")
    ap.add_argument("--train", type=int, default=6000, help="training scenes to load")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape-weight", type=float, default=1.0, help="factor on the shape task's loss (the demo uses 3)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    grid = 8
    train, test = load(a.world, "train", grid, a.train), load(a.world, "test", grid, 100)
    cfg = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                           image_size=64, patch_size=64 // grid, hidden_act="quick_gelu")
    tower = CLIPVisionModel(cfg)
    if a.init == "flat":  # what llava-rs drew before: uniform noise of std 0.02, norms 1, biases 0
        with torch.no_grad():
            for n, p in tower.named_parameters():
                if "norm" not in n:
                    p.zero_() if n.endswith("bias") else p.uniform_(-0.02 * 3 ** 0.5, 0.02 * 3 ** 0.5)
    heads = nn.ModuleDict({"colour": nn.Linear(128, 7), "count": nn.Linear(128, 5),
                           "shape": nn.Linear(128, 4 + int(a.shape_per_patch)), "order": nn.Linear(128, 5)})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, s / max(1, 0.05 * a.steps)) * 0.5 * (1 + math.cos(math.pi * min(1, s / a.steps))))

    def outputs(x, own, shape):
        f = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
        masks = torch.stack([(own == k + 1).float() for k in range(MAX_OBJECTS)], 1)
        pooled = masks @ f / masks.sum(-1, keepdim=True).clamp(min=1)
        present = shape >= 0
        order = torch.arange(MAX_OBJECTS).expand_as(shape)
        patch_shape = torch.where(own > 0, shape.gather(1, (own - 1).clamp(min=0)) + 1, 0)
        return {
            "colour": (heads["colour"](f), None),
            "count": (heads["count"](f), None),
            "shape": (heads["shape"](f), patch_shape) if a.shape_per_patch else (heads["shape"](pooled)[present], shape[present]),
            "order": (heads["order"](pooled)[present], order[present]),
        }

    def targets(out, colour, count):
        return {k: (v[1] if v[1] is not None else {"colour": colour, "count": count}[k]) for k, v in out.items()}

    def evaluate():
        with torch.no_grad():
            x, own, colour, count, shape = test
            out = outputs(x, own, shape)
            result = {}
            for k, y in targets(out, colour, count).items():
                pred = out[k][0].argmax(-1)
                keep = y != 0 if k == "colour" or (k == "shape" and a.shape_per_patch) else torch.ones_like(y, dtype=bool)
                result[k] = round(((pred == y) & keep).sum().item() / keep.sum().item(), 3)
            return result

    start = time.time()
    for step in range(a.steps):
        idx = torch.randint(0, len(train[0]), (a.batch,))
        x, own, colour, count, shape = (t[idx] for t in train)
        out = outputs(x, own, shape)
        loss = sum((a.shape_weight if k == "shape" else 1.0)
                   * nn.functional.cross_entropy(out[k][0].reshape(-1, out[k][0].shape[-1]), y.reshape(-1))
                   for k, y in targets(out, colour, count).items())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == a.steps:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 3), "held_out": evaluate(),
                              "seconds": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
