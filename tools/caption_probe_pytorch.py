"""How well a `tools/lookup_pytorch.py --save` state writes one caption kind (issue 29).

Teacher-forced accuracy on fresh scenes of a caption turn the runs train on but do not score:
`places` (each object's place from the left as a number) or `pairs` (position answers in
words). Prints the share of answer tokens right, of whole answers right, and of the place
numbers / left-right words alone, which is what the position look-up needs.

    python tools/caption_probe_pytorch.py /tmp/dec/runs/Q.pt places --n 100

The model's shape and tokenizer must be the run's (the defaults are BENCHMARKS.md's E1 runs).
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lookup_pytorch as L  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("state")
p.add_argument("kind", choices=["places", "pairs", "inventory", "colours"])
p.add_argument("--n", type=int, default=200, help="fresh scenes")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--width", type=int, default=128)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--mlp", type=int, default=512)
p.add_argument("--seed", type=int, default=1, help="the run's seed (it seeds the punct tokenizer)")
a = p.parse_args()
args = argparse.Namespace(tokenizer="punct", scene="words", no_system=True, layers=a.layers,
                          width=a.width, heads=a.heads, mlp=a.mlp, seed=a.seed, loss="all",
                          kinds=[a.kind])
task = L.Task(args)
st = torch.load(a.state, weights_only=False)
task.model.load_state_dict(st["model"]); task.model.eval()
rng = random.Random(12345)
tok_right = tok_all = exact = digits_right = digits_all = 0
n = 0
while n < a.n:
    scene = L.Scene(rng)
    qa = scene.question(a.kind, rng)
    if not qa:
        continue
    n += 1
    ids, labels, spans = task.record(scene, [(a.kind,) + qa], rng)
    with torch.no_grad():
        pred = task.model(inputs_embeds=task.embed(ids, scene, rng).unsqueeze(0)).logits[0].argmax(-1)
    s, e = spans[0]
    ok = [int(pred[i - 1]) == ids[i] for i in range(s, e)]
    tok_right += sum(ok); tok_all += len(ok); exact += all(ok)
    for i in range(s, e):
        t = task.tok.id_to_token(ids[i])
        if t.strip("▁").isdigit() or t.strip("▁") in ("left", "right"):
            digits_all += 1; digits_right += int(pred[i - 1]) == ids[i]
print(f"{a.kind} at step {st['step']}: answer tokens {tok_right/tok_all:.1%}, whole answers {exact/n:.1%}, "
      f"place/side tokens {digits_right/max(1,digits_all):.1%} ({digits_all})")
