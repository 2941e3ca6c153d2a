#!/usr/bin/env python3
"""Record what transformers computes with dynamic NTK and YaRN rope scaling.

Run by hand (never in CI), from the repo root, after tools/make_model_fixtures.py (it reads the
llava15-default checkpoint and changes nothing in it):

    /work/venv/bin/python tools/make_rope_fixture.py

Each case is llava15-default's weights under a config.json whose text_config has another
max_position_embeddings and rope scaling. Two prompts, both with the case's image, are each
run by a freshly loaded model (transformers' dynamic rope keeps state between calls), with the
manual greedy loop of make_model_fixtures.py (KV cache, EOS not special):
- short: the prompt fits the trained context and decoding crosses it (for `dynamic`, whose
  frequencies then change at every step);
- long: the prompt alone is past it.

Writes tests/fixtures/models/rope-scaling/:
- expected.json: per case the config.json to write, and per prompt the question, rendered
  prompt, input ids, greedy tokens and margins;
- expected.safetensors: `{case}.{prompt}.step_logits` `[steps, vocab]`, the logits before
  each greedy token.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import make_model_fixtures as base

SOURCE = base.OUT / "llava15-default"
OUT = base.OUT / "rope-scaling"
N_NEW = 24
QUESTIONS = {
    "short": "What is it?",
    "long": "Look at the whole picture carefully, then tell me which colours and shapes you can "
            "see, where each one is, and whether any of them overlap.",
}
CASES = {
    # The short prompt (36 tokens) crosses 44 at its 9th new token; the long one (102) starts
    # past it. Both stay within 4 x 44, the context llava-rs allows with this factor.
    "dynamic": dict(max_position_embeddings=44,
                    rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
    "yarn": dict(max_position_embeddings=256,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                  "original_max_position_embeddings": 64}),
    # DeepSeek-style: attention factor from mscale / mscale_all_dim, other ramp ends, no rounding
    # of them (the ramp runs over pairs 0.21 to 2.62 instead of 0 to 3).
    "yarn-mscale": dict(max_position_embeddings=256,
                        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 64, "beta_fast": 8.0,
                                         "beta_slow": 0.5, "mscale": 1.0, "mscale_all_dim": 0.5,
                                         "truncate": False}),
}


def case_config(spec: dict) -> dict:
    config = json.loads((SOURCE / "model" / "config.json").read_text())
    config = copy.deepcopy(config)
    config["text_config"].update(spec)
    return config


def checkpoint(tmp: Path, config: dict) -> Path:
    d = tmp / "model"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(SOURCE / "model", d)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


def inv_freq(model_dir: Path) -> torch.Tensor:
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.model.language_model.rotary_emb.inv_freq.clone()


def run(model_dir: Path, question: str, image: Image.Image):
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir), backend="pil")
    prompt = processor.apply_chat_template(base.conversation(question), add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    first = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
    tokens, margins, logits = base.greedy(model, first, inputs["attention_mask"], n=N_NEW)
    return prompt, inputs["input_ids"][0].tolist(), tokens, margins, logits


def main() -> None:
    expected_source = json.loads((SOURCE / "expected.json").read_text())
    image_name = expected_source["image"]
    image = Image.open(base.OUT / "images" / image_name).convert("RGB")
    OUT.mkdir(parents=True, exist_ok=True)
    cases, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = checkpoint(tmp / "plain", case_config({}))
        for name, spec in CASES.items():
            config = case_config(spec)
            model_dir = checkpoint(tmp / name, config)
            if spec["rope_parameters"].get("truncate") is False:
                rounded = copy.deepcopy(config)
                rounded["text_config"]["rope_parameters"]["truncate"] = True
                a = inv_freq(model_dir)
                b = inv_freq(checkpoint(tmp / "rounded", rounded))
                assert not torch.equal(a, b), f"{name}: truncate changes no frequency"
            prompts = {}
            for key, question in QUESTIONS.items():
                prompt, ids, tokens, margins, logits = run(model_dir, question, image)
                *_, plain_logits = run(plain, question, image)
                # The scaling must show in these logits, or the test could not fail.
                d = float((logits - plain_logits).abs().max())
                assert d > 1e-2, f"{name}/{key}: rope scaling changes no logit ({d})"
                first_d = float((logits[0] - plain_logits[0]).abs().max())
                ctx = spec["max_position_embeddings"]
                print(f"{name}/{key}: {len(ids)} ids (+{N_NEW}, context {ctx}) -> {tokens} "
                      f"min margin {min(margins):.4f}; vs plain rope: first step {first_d:.3g}, "
                      f"any step {d:.3g}")
                if min(margins) < base.MARGIN_MIN:
                    raise SystemExit(f"{name}/{key}: margin {min(margins)} < {base.MARGIN_MIN}")
                prompts[key] = {"question": question, "prompt": prompt, "input_ids": ids,
                                "greedy_tokens": tokens, "greedy_margins": margins}
                tensors[f"{name}.{key}.step_logits"] = logits
            cases[name] = {"config": config, "prompts": prompts}
    base.write_json(OUT / "expected.json", {
        "versions": base.versions(),
        "source": "llava15-default's model/ with each case's config.json",
        "image": image_name,
        "max_new_tokens": N_NEW,
        "note": "a freshly loaded model per prompt; the manual greedy loop of make_model_fixtures.py "
                "(KV cache, EOS not special); step_logits[i] are the logits before greedy token i",
        "cases": cases,
    })
    base.save_tensors(OUT / "expected.safetensors", tensors)


if __name__ == "__main__":
    main()
