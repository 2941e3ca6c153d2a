#!/usr/bin/env python3
"""Record what transformers' batched `generate()` gives on three existing fixture checkpoints.

Run by hand (never in CI), from the repo root, after tools/make_model_fixtures.py and
tools/make_next_fixture.py (it reads the checkpoints they wrote and changes none of them):

    /work/venv/bin/python tools/make_batch_fixture.py

For each case it builds three chat prompts of different lengths: two with an image each and one
with none, in the middle. The processor pads them on the left (`padding_side="left"`), and
`model.generate(do_sample=False)` decodes them together. It writes, beside the case's
expected.json:
- batch_generate.json: per row the question, image, rendered prompt, unpadded input ids, the
  padded batch's greedy tokens (up to and with EOS), each step's top1-top2 margin, and the
  tokens the same prompt gives alone (transformers itself gives the same);
- batch_generate.safetensors: `first_logits` `[rows, vocab]`, the batch's first-step logits.

Cases:
- llava15-default: LLaVA-1.5, multi-head attention;
- mistral-sliding-window: a 16-token window, shorter than every prompt, so the window and the
  padding mask cut keys together;
- llava-next: anyres images of 5 and 4 tiles (113 and 105 image tokens).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import make_model_fixtures as base

N_NEW = 16
CASES = {
    "llava15-default": ("shapes_64x48.png", "tall_40x60.png"),
    "mistral-sliding-window": ("shapes_64x48.png", "tall_40x60.png"),
    "llava-next": ("shapes_64x48.png", "wide_96x28.png"),
}
QUESTION_SETS = [
    ["What is it?", "Write one sentence about a blue kite in the wind.", "Which colours are in this picture, and where?"],
    ["Describe it.", "Tell me about the sea at night.", "How many shapes are there in the image?"],
    ["Is it big?", "Give me a short poem about rain on a roof.", "What is in the top left corner of the picture?"],
]


def conversation(question: str, image: bool) -> list:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def run_case(name: str, image_names: tuple[str, str]) -> None:
    d = base.OUT / name
    model = AutoModelForImageTextToText.from_pretrained(str(d / "model"), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(d / "model"), backend="pil")
    processor.tokenizer.padding_side = "left"
    pad = processor.tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    images = [Image.open(base.OUT / "images" / n).convert("RGB") for n in image_names]
    has_image = [True, False, True]
    for questions in QUESTION_SETS:
        prompts = [processor.apply_chat_template(conversation(q, im), add_generation_prompt=True)
                   for q, im in zip(questions, has_image)]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, pad_token_id=pad,
                                 output_scores=True, return_dict_in_generate=True)
        start = inputs["input_ids"].shape[1]
        rows = []
        for r in range(len(prompts)):
            tokens = until_eos(out.sequences[r, start:].tolist(), eos)
            margins = [base.margin_of(out.scores[i][r]) for i in range(len(tokens))]
            ids = inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist()
            row_images = [images[0 if r == 0 else 1]] if has_image[r] else None
            alone = processor(images=row_images, text=prompts[r], return_tensors="pt")
            assert alone["input_ids"][0].tolist() == ids, "padding changed a row's ids"
            with torch.no_grad():
                single = model.generate(**alone, do_sample=False, max_new_tokens=N_NEW, pad_token_id=pad)
            rows.append({
                "question": questions[r],
                "image": image_names[0 if r == 0 else 1] if has_image[r] else None,
                "prompt": prompts[r],
                "input_ids": ids,
                "greedy_tokens": tokens,
                "greedy_margins": margins,
                "alone_tokens": until_eos(single[0, len(ids):].tolist(), eos),
            })
        low = min(min(r["greedy_margins"]) for r in rows)
        if low < base.MARGIN_MIN or any(len(r["greedy_tokens"]) < 4 for r in rows):
            print(f"{name}: questions {questions} give margin {low:.4g}; trying the next set")
            continue
        exp = {
            "case": name,
            "versions": base.versions(),
            "note": "processor(images, text=prompts, padding=True) with padding_side='left', then "
                    f"generate(do_sample=False, max_new_tokens={N_NEW}, pad_token_id={pad}); EOS {eos}",
            "eos_token_id": eos,
            "max_new_tokens": N_NEW,
            "padded_length": start,
            "rows": rows,
        }
        base.write_json(d / "batch_generate.json", exp)
        base.save_tensors(d / "batch_generate.safetensors",
                          {"first_logits": out.scores[0].float().contiguous()})
        for r in rows:
            same = "same" if r["alone_tokens"] == r["greedy_tokens"] else "DIFFERENT"
            print(f"{name}: {len(r['input_ids'])} ids -> {r['greedy_tokens']} "
                  f"(min margin {min(r['greedy_margins']):.4f}; alone: {same})")
        return
    raise SystemExit(f"{name}: no question set gave clear greedy margins")


def main() -> None:
    torch.manual_seed(0)
    for name, image_names in CASES.items():
        run_case(name, image_names)


if __name__ == "__main__":
    main()
