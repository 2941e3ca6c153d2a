"""Can the demo's decoder, trained from scratch, learn to find the object a question names?
(BENCHMARKS.md, "The offline demo": what limits colour and shape.)

Trains transformers' LlamaForCausalLM shaped as the demo's decoder (3 layers, width 192, 3
heads, MLP 512) on one question kind only, "What colour is the {shape}?" about scenes of 1-5
objects of the demo's colours and shapes, the asked shape appearing once. The loss is on the
answer word and `</s>`, as in stage 2. Prints the loss and held-out accuracy (greedy first
token, 200 questions) every --every steps.

Two ways to give the scene:

- `--scene words`: the scene written out as the demo's text-only records do, "The picture:
  From left to right: a red square, a blue circle.", inside the llava_v1 prompt.
- `--scene patches`: an 8x8 grid of 64 "image tokens" whose features are exact: each patch
  covered by an object holds one-hot colour and one-hot shape, the others one-hot background,
  through a 2-layer GELU projector. A tower cannot see better than this, so this is the
  decoder's best case.

    llava demo --out /tmp/demo --stop-after init
    python tools/lookup_pytorch.py --tokenizer /tmp/demo/init/tokenizer.json --scene words
    python tools/lookup_pytorch.py --tokenizer /tmp/demo/init/tokenizer.json --scene patches
"""

import argparse
import random
import time

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
BACKGROUNDS = 4
FEATURES = len(COLOURS) + BACKGROUNDS + len(SHAPES)
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SUFFIX = "\nAnswer the question using a single word or phrase."


def scene(rng):
    """Objects left to right and the index of the one asked about (its shape is unique)."""
    while True:
        objects = [(rng.choice(COLOURS), rng.choice(SHAPES)) for _ in range(rng.randint(1, 5))]
        shapes = [s for _, s in objects]
        unique = [i for i, (_, s) in enumerate(objects) if shapes.count(s) == 1]
        if unique:
            return objects, rng.choice(unique)


def patch_features(objects, rng, grid=8):
    """Each object on a 2x2 block of patches, placed left to right in random rows."""
    features = torch.zeros(grid * grid, FEATURES)
    features[:, len(COLOURS) + rng.randrange(BACKGROUNDS)] = 1
    columns = sorted(rng.sample(range(0, grid - 1), len(objects)))
    for (colour, shape), col in zip(objects, columns):
        row = rng.randrange(grid - 1)
        for dr in (0, 1):
            for dc in (0, 1):
                p = (row + dr) * grid + col + dc
                features[p] = 0
                features[p, COLOURS.index(colour)] = 1
                features[p, len(COLOURS) + BACKGROUNDS + SHAPES.index(shape)] = 1
    return features


class Task:
    def __init__(self, args):
        self.tok = Tokenizer.from_file(args.tokenizer)
        self.words = args.scene == "words"
        cfg = LlamaConfig(vocab_size=self.tok.get_vocab_size(), hidden_size=192,
                          intermediate_size=512, num_hidden_layers=args.layers,
                          num_attention_heads=3, num_key_value_heads=3,
                          max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                          pad_token_id=3)
        torch.manual_seed(args.seed)
        self.model = LlamaForCausalLM(cfg)
        self.projector = torch.nn.Sequential(torch.nn.Linear(FEATURES, 192), torch.nn.GELU(),
                                             torch.nn.Linear(192, 192))

    def ids(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def example(self, rng):
        """(input embeddings, labels, number of answer tokens, answer word)."""
        objects, asked = scene(rng)
        colour, shape = objects[asked]
        question = f"What colour is the {shape}?{SUFFIX} ASSISTANT:"
        answer = self.ids(f" {colour}") + [2]
        embed = self.model.get_input_embeddings()
        if self.words:
            listed = ", ".join(f"a {c} {s}" for c, s in objects)
            prompt = [1] + self.ids(f"{SYSTEM} USER: The picture: From left to right: {listed}.\n"
                                    + question)
            x = embed(torch.tensor(prompt + answer))
            labels = [-100] * len(prompt) + answer
        else:
            before = [1] + self.ids(f"{SYSTEM} USER:")
            after = self.ids("\n" + question)
            x = torch.cat([embed(torch.tensor(before)),
                           self.projector(patch_features(objects, rng)),
                           embed(torch.tensor(after + answer))])
            labels = [-100] * (len(before) + 64 + len(after)) + answer
        return x, labels, len(answer), colour

    def parameters(self):
        return list(self.model.parameters()) + list(self.projector.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="the demo's OUT/init/tokenizer.json")
    ap.add_argument("--scene", choices=["words", "patches"], default="words")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = Task(args)
    params = task.parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng, held_out = random.Random(args.seed), random.Random(args.seed + 1_000_003)
    tests = [task.example(held_out) for _ in range(200)]

    def accuracy():
        task.model.eval()
        right = 0
        with torch.no_grad():
            for x, _, n_answer, colour in tests:
                logits = task.model(inputs_embeds=x[:-n_answer][None]).logits[0, -1]
                right += task.tok.decode([int(logits.argmax())]).strip() == colour
        task.model.train()
        return right / len(tests)

    start = time.time()
    for step in range(1, args.steps + 1):
        batch = [task.example(rng) for _ in range(args.batch_size)]
        width = max(len(b[1]) for b in batch)
        x = torch.zeros(len(batch), width, 192)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (e, l, _, _) in enumerate(batch):
            x[i, :len(l)], labels[i, :len(l)], mask[i, :len(l)] = e, torch.tensor(l), 1
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 50)
        loss = task.model(inputs_embeds=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if step % args.every == 0:
            print(f"step {step}  questions {step * args.batch_size}  loss {loss.item():.3f}  "
                  f"held-out colour {accuracy():.1%}  {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
