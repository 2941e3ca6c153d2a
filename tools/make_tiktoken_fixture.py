#!/usr/bin/env python3
"""Record what OpenAI's `tiktoken` (the pip package, the reference implementation) counts for
the built-in prompt files, so `llava instruct --dry-run`'s token counts (tiktoken-rs) can be
tested against it.

Run by hand (never in CI), from the repo root:

    pip install tiktoken
    python3 tools/make_tiktoken_fixture.py ~/.cargo/registry/src/*/tiktoken-rs-*/assets

pip tiktoken downloads its encoding files from openaipublic.blob.core.windows.net at first use.
Where that host cannot be reached, pass the `assets` folder of the tiktoken-rs crate (it ships
the same files): the script places them in a private TIKTOKEN_CACHE_DIR under the names tiktoken
looks for, and tiktoken itself checks each file's SHA-256 against the hash it has built in
(`tiktoken_ext/openai_public.py`), so only the genuine files are accepted.

It writes crates/llava-instruct/tests/fixtures/tiktoken_counts.json:
- `text[encoding][file]`: `len(enc.encode(text))` of each prompt file (as the crate embeds it);
- `chat[encoding][type]`: the prompt tokens of the type's system message and few-shot examples
  followed by one query context, counted as OpenAI's cookbook "How to count tokens with
  tiktoken" does for gpt-4o and gpt-4: 3 per message, plus the role and content tokens, plus 3
  for the reply's priming.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile

import tiktoken

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "crates/llava-instruct/prompts"
OUT = ROOT / "crates/llava-instruct/tests/fixtures/tiktoken_counts.json"
ENCODINGS = ["o200k_base", "cl100k_base"]
URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
QUERY = "A man rides a bicycle down a city street.\nA cyclist passes parked cars."


def seed_cache(assets: pathlib.Path) -> None:
    cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
    for name in ENCODINGS:
        key = hashlib.sha1(URL.format(name).encode()).hexdigest()
        data = (assets / f"{name}.tiktoken").read_bytes()
        (pathlib.Path(cache) / key).write_bytes(data)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache


def examples(ty: str) -> list[tuple[str, str]]:
    d = PROMPTS / ty
    out = []
    n = 1
    while (d / f"fewshot_{n:03}_context.txt").exists():
        ctx = (d / f"fewshot_{n:03}_context.txt").read_text()
        rep = (d / f"fewshot_{n:03}_reply.txt").read_text()
        out.append((ctx, rep))
        n += 1
    return out


def chat_tokens(enc, messages: list[tuple[str, str]]) -> int:
    n = 0
    for role, content in messages:
        n += 3 + len(enc.encode(role)) + len(enc.encode(content))
    return n + 3


def main() -> None:
    if len(sys.argv) > 1:
        seed_cache(pathlib.Path(sys.argv[1]))
    files = sorted(p for p in PROMPTS.rglob("*.txt"))
    result = {"query": QUERY, "text": {}, "chat": {}, "tiktoken": tiktoken.__version__}
    for name in ENCODINGS:
        enc = tiktoken.get_encoding(name)
        result["text"][name] = {
            str(p.relative_to(PROMPTS)): len(enc.encode(p.read_text())) for p in files
        }
        result["chat"][name] = {}
        for ty in ["conversation", "detail", "complex"]:
            msgs = [("system", (PROMPTS / ty / "system.txt").read_text())]
            for ctx, rep in examples(ty):
                msgs += [("user", ctx), ("assistant", rep)]
            msgs.append(("user", QUERY))
            result["chat"][name][ty] = chat_tokens(enc, msgs)
    OUT.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
