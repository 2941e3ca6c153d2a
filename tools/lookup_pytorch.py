"""Can a decoder trained from scratch on the shapes world's text answer questions about a scene?
(BENCHMARKS.md, "The offline demo": the decoder's pretraining recipe, issue 29.)

Trains transformers' LlamaForCausalLM on the demo's text-only records: a scene written out as
the demo's left-to-right caption ("The picture: From left to right: a red square, a large blue
circle and a green star."), then questions about it inside the llava_v1 prompt, one per turn, as
`llava_demo::data::text_probe_records` writes them. Question kinds (`--kinds`):

- colour   "What colour is the {shape}?"              -> red      (the shape is unique)
- shape    "Which shape is {colour}?"                 -> square   (the colour is unique)
- count    "How many shapes are there in the image?"  -> 3
- position "Is the {a} to the left or to the right of the {b}?" -> left / right
- yesno    "Is there a {colour} {shape} in the picture?"        -> Yes / No

and two caption turns that are trained on but not scored:

- inventory "Describe the image briefly." -> the demo's inventory caption, the objects in a new
            order ("An image showing a green star and a red circle."): each shape after its
            colour is the shape question's look-up.
- colours   "What colour is each shape?" -> "The square is red and the circle is blue.": each
            colour after its shape is the colour question's look-up.
- pairs     "Where are the shapes?" -> up to three position answers in words ("The red square
            is to the left of the blue circle, ..."): the position question, densely.
- places    "Count the shapes from the left." -> each object's place as a number, in a random
            order ("The blue circle is 2 and the red square is 1."): position as two look-ups.

The world, the templates and the prompt copy crates/llava-demo (world/scene.rs, captions.rs,
questions.rs, teacher/conversation.rs) and llava-data's llava_v1 template. Held-out scenes are
drawn first from their own seed; no training scene of two or more objects lists the same
objects in the same order as a held-out scene (single objects cannot be kept apart: there are
only 24). Held-out accuracy is exact greedy answering of single-turn questions (every answer
token and `</s>` argmax-right under teacher forcing, which is what greedy decoding would
produce), per kind. `--bench OUT/data/bench_words.jsonl` also scores the demo's own held-out
"in words" questions.

Recipe knobs: `--tokenizer` (the demo's tokenizer.json, or `punct`: the same BPE retrained
here on the world's text with punctuation and newlines split off words), model shape
(`--layers --width --heads --mlp`), `--lr --warmup --schedule`, `--batch-size`, `--turns`
(questions per scene), `--loss answers|all`, `--curriculum N` (the most objects a training scene
may hold rises from 1 to 5 over the first N steps), `--no-system`, `--then STEP:KINDS:TURNS` (from
STEP on, other kinds and turns: a second phase once the first look-ups have formed), `--save
PATH` (state written every --every steps; a rerun with the same flags resumes from it exactly),
`--scene-text order+colours` (the scene's caption followed by each shape's colour, shape first:
"The square is red and the circle is blue."), or `--scene-text shape-colour` (each object
written shape first, its colour the next word: "From left to right: a square red and a circle
blue.", so that the colour question's look-up is a copy forwards, as the shape question's is
in the demo's order; the inventory caption is written the same way), or `--scene-text both`
(the demo's order, then "In turn: square red and circle blue.", and each inventory caption in
one of the two orders). `--scene patches` replaces
the words with 64 exact patch features (one-hot colour and shape on each object's 2x2 block)
through a 2-layer GELU projector: the decoder's best case with a perfect tower.

Prints, every --every steps: step, the mean training loss since the last print, held-out
accuracy per kind, colour accuracy by the scene's number of objects (a model reading the scene
as a bag of colours gets about 1/n), the demo bench's accuracy, seconds, steps/s, tokens/s. Run with 1 thread and low priority:

    llava demo --out /tmp/demo --stop-after init
    nice -n 19 python tools/lookup_pytorch.py --tokenizer /tmp/demo/init/tokenizer.json \
        --bench /tmp/demo/data/bench_words.jsonl --steps 20000 --every 1000
"""

import argparse
import json
import math
import os
import random
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
BACKGROUNDS = ["white", "light grey", "beige", "cream", "dark grey"]
MAX_OBJECTS = 5
# How a scene is written (`--scene-text`): the demo's left-to-right caption, or that caption
# followed by each shape's colour, shape first.
SCENE_TEXT = "order"
KINDS = ["colour", "shape", "count", "position", "yesno"]
# Train-only kinds: long answers, not scored.
CAPTION_KINDS = ["inventory", "colours", "pairs", "places"]
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SUFFIX = "Answer the question using a single word or phrase."
PATCH_FEATURES = len(COLOURS) + len(BACKGROUNDS) + len(SHAPES)


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(c, s, size, rng, shape_first=False):
    """One object as the demo's captions write it ("a red square", half the time with its size:
    "a large red square"), or shape first with its colour the next word ("a square red")."""
    if shape_first:
        return f"{article(s)} {s} {c}"
    w = f"{size} {c} {s}" if rng.random() < 0.5 else f"{c} {s}"
    return f"{article(w)} {w}"


def join_list(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Scene:
    """Objects (colour, shape, size) left to right, and a background."""

    def __init__(self, rng, max_objects=MAX_OBJECTS):
        n = rng.randint(1, max_objects)
        pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
        self.objects = [(c, s, rng.choice(["small", "large"])) for c, s in pairs]
        self.background = rng.choice(BACKGROUNDS)

    def key(self):
        return tuple((c, s) for c, s, _ in self.objects)

    def words(self, rng):
        """The demo's `order` caption (world/captions.rs)."""
        phrases = [object_phrase(c, s, size, rng, SCENE_TEXT == "shape-colour")
                   for c, s, size in self.objects]
        if len(phrases) == 1:
            p = phrases[0]
            text = f"{p[0].upper()}{p[1:]} on {article(self.background)} {self.background} background."
        else:
            listed = join_list(phrases)
            text = rng.choice([f"From left to right: {listed}.", f"Left to right, there is {listed}.",
                               f"Reading from left to right we see {listed}."])
        if SCENE_TEXT == "both":
            # The objects again, shape first with the colour the next word, so that both
            # look-ups are copies forwards: the shape after its colour in the caption, the
            # colour after its shape here.
            text += " In turn: " + join_list([f"{s} {c}" for c, s, _ in self.objects]) + "."
        if SCENE_TEXT == "order+colours":
            # Each shape's colour again, shape first, so that the colour question's look-up is
            # a copy forwards (find the shape, read the word after it), as the shape question's is.
            items = join_list([f"the {s} is {c}" for c, s, _ in self.objects])
            text += f" {items[0].upper()}{items[1:]}."
        return text

    def question(self, kind, rng):
        """(question, answer) of one kind, or None when the scene cannot pose it
        (llava_demo::questions::probe; yes/no as the teacher's present/absent pairs)."""
        objs = self.objects
        if kind == "colour":
            unique = [o for o in objs if sum(p[1] == o[1] for p in objs) == 1]
            if not unique:
                return None
            c, s, _ = rng.choice(unique)
            return rng.choice([f"What colour is the {s}?", f"What is the colour of the {s}?",
                               f"Which colour does the {s} have?"]), c
        if kind == "shape":
            unique = [o for o in objs if sum(p[0] == o[0] for p in objs) == 1]
            if not unique:
                return None
            c, s, _ = rng.choice(unique)
            return rng.choice([f"What shape is the {c} object?", f"Which shape is {c}?"]), s
        if kind == "count":
            return rng.choice(["How many shapes are there in the image?",
                               "How many objects are in the picture?",
                               "Count the shapes in the image."]), str(len(objs))
        if kind == "position":
            if len(objs) < 2:
                return None
            i, j = rng.sample(range(len(objs)), 2)
            (ca, sa, _), (cb, sb, _) = objs[i], objs[j]
            return (f"Is the {ca} {sa} to the left or to the right of the {cb} {sb}?",
                    "left" if i < j else "right")
        if kind == "yesno":
            present = {(c, s) for c, s, _ in objs}
            if rng.random() < 0.5:
                c, s, _ = rng.choice(objs)
                answer = "Yes"
            else:
                absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
                near = [(c, s) for c, s in absent if any(c == o[0] or s == o[1] for o in objs)]
                c, s = rng.choice(near if near and rng.random() < 0.7 else absent)
                answer = "No"
            name = f"{c} {s}"
            return rng.choice([f"Is there {article(name)} {name} in the picture?",
                               f"Can you see {article(name)} {name}?",
                               f"Does the image contain {article(name)} {name}?"]), answer
        if kind == "inventory":
            # The demo's `inventory` caption: every object again, in a random order. Each
            # object after its first word is a lookup in the scene (which shape goes with this
            # colour), so every caption is several binding questions at once.
            phrases = []
            for c, s, size in rng.sample(objs, len(objs)):
                shape_first = SCENE_TEXT == "shape-colour" or (SCENE_TEXT == "both" and rng.random() < 0.5)
                phrases.append(object_phrase(c, s, size, rng, shape_first))
            if len(phrases) == 1:
                return "Describe the image briefly.", f"A picture of a single {objs[0][0]} {objs[0][1]}."
            return "Describe the image briefly.", rng.choice(
                [f"An image showing {join_list(phrases)}.", f"Some shapes: {join_list(phrases)}."])
        if kind == "colours":
            # Each shape's colour, shape first: every item is the colour question's lookup
            # (from the shape to the word before it in the scene), as inventory's items are the
            # shape question's.
            unique = [o for o in objs if sum(p[1] == o[1] for p in objs) == 1]
            if not unique:
                return None
            items = [f"the {s} is {c}" for c, s, _ in rng.sample(unique, len(unique))]
            text = join_list(items)
            return "What colour is each shape?", f"{text[0].upper()}{text[1:]}."
        if kind == "pairs":
            # Up to three of the position question's answers at once, in the question's own
            # words: a dense signal for comparing two objects' places in the list.
            if len(objs) < 2:
                return None
            pairs = rng.sample([(i, j) for i in range(len(objs)) for j in range(len(objs))
                                if i != j], min(3, len(objs) * (len(objs) - 1)))
            items = [f"the {objs[i][0]} {objs[i][1]} is to the "
                     f"{'left' if i < j else 'right'} of the {objs[j][0]} {objs[j][1]}"
                     for i, j in pairs]
            text = join_list(items)
            return "Where are the shapes?", f"{text[0].upper()}{text[1:]}."
        if kind == "places":
            # Each object's place from the left as a number, in a random order: the position
            # question becomes two look-ups of a number and a comparison.
            if len(objs) < 2:
                return None
            order = rng.sample(range(len(objs)), len(objs))
            items = [f"the {objs[i][0]} {objs[i][1]} is {i + 1}" for i in order]
            text = join_list(items)
            return "Count the shapes from the left.", f"{text[0].upper()}{text[1:]}."
        raise ValueError(kind)

    def patch_features(self, rng, grid=8):
        """Each object on a 2x2 block of patches in distinct, non-overlapping columns."""
        features = torch.zeros(grid * grid, PATCH_FEATURES)
        features[:, len(COLOURS) + rng.randrange(len(BACKGROUNDS))] = 1
        columns = sorted(rng.sample(range(0, grid // 2), len(self.objects)))
        for (colour, shape, _), col in zip(self.objects, columns):
            row = rng.randrange(grid - 1)
            for dr in (0, 1):
                for dc in (0, 1):
                    p = (row + dr) * grid + 2 * col + dc
                    features[p] = 0
                    features[p, COLOURS.index(colour)] = 1
                    features[p, len(COLOURS) + len(BACKGROUNDS) + SHAPES.index(shape)] = 1
        return features


def punct_tokenizer(vocab_size, seed):
    """The demo's BPE (Metaspace, 512 ids, the same specials), but with punctuation and
    newlines split off words, so that "square" is one token in "a red square," and in
    "the square?\\n"."""
    rng = random.Random(seed + 7)
    texts = []
    for _ in range(3000):
        s = Scene(rng)
        turns = [s.question(k, rng) for k in KINDS]
        texts.append(f"{SYSTEM} USER: The picture: {s.words(rng)}\n"
                     + " ".join(f"{q[0]}\n{SUFFIX} ASSISTANT: {q[1]}" for q in turns if q))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"], initial_alphabet=alphabet))
    return tok


class Task:
    def __init__(self, args):
        self.args = args
        self.tok = (punct_tokenizer(512, args.seed) if args.tokenizer == "punct"
                    else Tokenizer.from_file(args.tokenizer))
        self.words = args.scene == "words"
        self.system = "" if args.no_system else SYSTEM + " "
        cfg = LlamaConfig(vocab_size=self.tok.get_vocab_size(), hidden_size=args.width,
                          intermediate_size=args.mlp, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.heads,
                          max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                          pad_token_id=3, attn_implementation="sdpa")
        torch.manual_seed(args.seed)
        self.model = LlamaForCausalLM(cfg)
        self.projector = torch.nn.Sequential(torch.nn.Linear(PATCH_FEATURES, args.width),
                                             torch.nn.GELU(),
                                             torch.nn.Linear(args.width, args.width))

    def ids(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def record(self, scene, asked, rng):
        """Token ids (or embeddings), labels and per-answer spans of one conversation about
        `scene`: `asked` is a list of (kind, question, answer). Labels are -100 where the loss
        is off."""
        head = self.system + "USER: "
        first = (f"The picture: {scene.words(rng)}\n" if self.words else "<image>\n")
        pieces = []  # (ids, supervised)
        for t, (_, q, a) in enumerate(asked):
            opener = head + first if t == 0 else "USER: "
            pieces.append((([1] if t == 0 else []) + self.ids(f"{opener}{q}\n{SUFFIX} ASSISTANT:"),
                           False))
            pieces.append((self.ids(f" {a}") + [2], True))
        ids, labels, spans = [], [], []
        for piece, supervised in pieces:
            if supervised:
                spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
            labels += piece if (supervised or self.args.loss == "all") else [-100] * len(piece)
        return ids, labels, spans

    def conversation(self, rng, max_objects, turns, key_out=None):
        while True:
            scene = Scene(rng, max_objects)
            if key_out is None or len(scene.objects) == 1 or scene.key() not in key_out:
                break
        kinds = list(self.args.kinds)
        rng.shuffle(kinds)
        asked = []
        for k in kinds:
            qa = scene.question(k, rng)
            if qa:
                asked.append((k,) + qa)
        if turns > len(asked):  # more turns than kinds: ask again (other objects, other words)
            extra = [rng.choice(self.args.kinds) for _ in range(turns - len(asked))]
            asked += [(k,) + qa for k in extra if (qa := scene.question(k, rng))]
        return scene, asked[:turns]

    def embed(self, ids, scene, rng):
        """Input embeddings, with the patch features in place of `<image>` (id 4)."""
        x = self.model.get_input_embeddings()(torch.tensor(ids))
        if self.words:
            return x
        at = ids.index(4)
        return torch.cat([x[:at], self.projector(scene.patch_features(rng)), x[at + 1:]])

    def parameters(self):
        return list(self.model.parameters()) + (
            [] if self.words else list(self.projector.parameters()))


def collate(examples, width):
    """Right-padded batch; no attention mask is needed, as the padding comes last."""
    n = max(x.shape[0] for x, _ in examples)
    xs = torch.zeros(len(examples), n, width)
    labels = torch.full((len(examples), n), -100)
    for i, (x, l) in enumerate(examples):
        xs[i, :x.shape[0]], labels[i, :len(l)] = x, torch.tensor(l)
    return xs, labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True,
                    help="the demo's OUT/init/tokenizer.json, or `punct`")
    ap.add_argument("--scene", choices=["words", "patches"], default="words")
    ap.add_argument("--scene-text", choices=["order", "order+colours", "shape-colour", "both"], default="order",
                    help="the scene in words: the demo's caption, it and each shape's colour, the objects shape first, or both orders")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--mlp", type=int, default=512)
    ap.add_argument("--turns", type=int, default=1, help="questions per training scene")
    ap.add_argument("--loss", choices=["answers", "all"], default="answers")
    ap.add_argument("--curriculum", type=int, default=0,
                    help="steps over which the most objects per scene rises from 1 to 5")
    ap.add_argument("--no-system", action="store_true", help="leave out the system prompt")
    ap.add_argument("--held-out", type=int, default=100, help="held-out questions per kind")
    ap.add_argument("--bench", help="also score the demo's OUT/data/bench_words.jsonl")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", metavar="PATH",
                    help="write the model, optimizer and data state here at every --every "
                         "steps, and resume from it when it exists")
    ap.add_argument("--then", metavar="STEP:KINDS:TURNS",
                    help="from STEP on, train on KINDS with TURNS per scene (a two-phase "
                         "curriculum: new look-ups added once the first ones have formed)")
    args = ap.parse_args()
    args.kinds = args.kinds.split(",")
    global SCENE_TEXT
    SCENE_TEXT = args.scene_text
    then = None
    if args.then:
        step, kinds, turns = args.then.split(":")
        then = (int(step), kinds.split(","), int(turns))
    torch.set_num_threads(args.threads)
    print(" ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    task = Task(args)
    params = task.parameters()
    print(f"parameters {sum(p.numel() for p in params):,}", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng, held_rng = random.Random(args.seed), random.Random(args.seed + 1_000_003)

    # Held-out: `--held-out` single-turn questions per kind, from scenes of 1-5 objects.
    tests, held_keys = {k: [] for k in args.kinds if k not in CAPTION_KINDS}, set()
    while any(len(v) < args.held_out for v in tests.values()):
        scene = Scene(held_rng)
        for k in tests:
            qa = scene.question(k, held_rng)
            if qa and len(tests[k]) < args.held_out:
                tests[k].append(task.record(scene, [(k,) + qa], held_rng) + (scene,))
                if len(scene.objects) > 1:
                    held_keys.add(scene.key())
    bench = {}
    if args.bench:
        for line in open(args.bench):
            q = json.loads(line)
            ids = [1] + task.ids(f"{task.system}USER: {q['question']}\n{SUFFIX} ASSISTANT:")
            answer = task.ids(f" {q['answer']}") + [2]
            bench.setdefault(q["category"], []).append(
                (ids + answer, [-100] * len(ids) + answer,
                 [(len(ids), len(ids) + len(answer))], None))

    def accuracy(sets, by_objects=None):
        """Per kind; with `by_objects`, also that kind's accuracy by the scene's object count
        (where a model that reads the scene as a bag of colours gets about 1/n)."""
        task.model.eval()
        out = {}
        with torch.no_grad():
            for kind, items in sets.items():
                right = []
                for b in range(0, len(items), 50):
                    chunk = items[b:b + 50]
                    xs, _ = collate([(task.embed(i, s, random.Random(7)), i)
                                     for i, _, _, s in chunk], args.width)
                    pred = task.model(inputs_embeds=xs).logits.argmax(-1)
                    for row, (ids, _, spans, _) in enumerate(chunk):
                        a, e = spans[0]
                        right.append(bool((pred[row, a - 1:e - 1] == torch.tensor(ids[a:e])).all()))
                out[kind] = sum(right) / len(items)
                if kind == by_objects:
                    for n in range(1, MAX_OBJECTS + 1):
                        hits = [r for r, it in zip(right, items) if len(it[3].objects) == n]
                        if hits:
                            out[f"n{n}"] = sum(hits) / len(hits)
        task.model.train()
        return out

    def lr_at(step):
        warm = min(1.0, step / max(1, args.warmup))
        if args.schedule == "cosine":
            progress = max(0.0, (step - args.warmup) / max(1, args.steps - args.warmup))
            warm *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return args.lr * warm

    start, losses, tokens, first = time.time(), [], 0, 1
    if args.save and os.path.exists(args.save):
        state = torch.load(args.save, weights_only=False)
        task.model.load_state_dict(state["model"])
        task.projector.load_state_dict(state["projector"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        args.kinds, args.turns, tokens = state["kinds"], state["turns"], state["tokens"]
        first = state["step"] + 1
        start -= state["elapsed"]
        print(f"resumed from {args.save} at step {state['step']}", flush=True)
    for step in range(first, args.steps + 1):
        if then and step == then[0]:
            args.kinds, args.turns = then[1], then[2]
            print(f"step {step}: now kinds {','.join(args.kinds)}, turns {args.turns}", flush=True)
        max_objects = MAX_OBJECTS
        if args.curriculum:
            max_objects = min(MAX_OBJECTS, 1 + (MAX_OBJECTS * step) // args.curriculum)
        batch = []
        for _ in range(args.batch_size):
            scene, asked = task.conversation(rng, max_objects, args.turns, held_keys)
            ids, labels, _ = task.record(scene, asked, rng)
            batch.append((task.embed(ids, scene, rng), labels))
            tokens += len(ids)
        xs, labels = collate(batch, args.width)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = task.model(inputs_embeds=xs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % args.every == 0 or step == args.steps:
            acc = accuracy(tests, by_objects="colour" if "colour" in tests else None)
            line = "  ".join(f"{k} {v:.1%}" for k, v in acc.items() if k in tests)
            by_n = [f"{k} {v:.0%}" for k, v in acc.items() if k not in tests]
            if by_n:
                line += "  (colour by objects: " + " ".join(by_n) + ")"
            if bench:
                line += "  | demo bench " + "  ".join(
                    f"{k} {v:.1%}" for k, v in accuracy(bench).items())
            elapsed = time.time() - start
            print(f"step {step}  max_objects {max_objects}  loss {sum(losses) / len(losses):.3f}  "
                  f"{line}  {elapsed:.0f} s  {step / elapsed:.2f} steps/s  "
                  f"{tokens / elapsed:.0f} tok/s", flush=True)
            losses = []
            if args.save:
                torch.save({"model": task.model.state_dict(),
                            "projector": task.projector.state_dict(),
                            "opt": opt.state_dict(), "rng": rng.getstate(), "step": step,
                            "kinds": args.kinds, "turns": args.turns, "tokens": tokens,
                            "elapsed": elapsed}, args.save + ".tmp")
                os.replace(args.save + ".tmp", args.save)


if __name__ == "__main__":
    main()
