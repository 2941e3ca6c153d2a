"""A tiny LLaMA-style SentencePiece tokenizer, and what transformers makes of it.

The original LLaVA releases (liuhaotian/*) and the Vicuna bases ship `tokenizer.model` only, no
`tokenizer.json`. llava-rs converts the SentencePiece model itself; this records the reference:

- trains a BPE SentencePiece model with LLaMA's settings (byte fallback, split digits, no
  normalisation, unk/bos/eos = 0/1/2) on a small built-in corpus;
- writes it with tokenizer_config.json variants: `legacy` false and true, and one with an added
  `<image>` token in `added_tokens_decoder`;
- records, for each variant, transformers' AutoTokenizer ids (with and without the BOS) for a set
  of strings, and the decoded text; and SentencePiece's own ids for the plain strings.

Run by hand (needs `pip install transformers tokenizers sentencepiece protobuf`):
    python tools/make_sentencepiece_fixture.py
Writes tests/fixtures/tokenizers/sentencepiece/{model,variants}/ and expected.json.
"""

import io
import json
import shutil
from pathlib import Path

import sentencepiece as spm
import tokenizers
import transformers
from transformers import AutoTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/tokenizers/sentencepiece"

CORPUS = """A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in this image? ASSISTANT: A red circle and a blue square on a white table.
USER: How many people are there in 2023? ASSISTANT: There are 12 people, 3 of them children.
Describe the picture in detail. The cat is sitting on the windowsill, looking at the birds.
What colour is the car? The car is green, parked beside the old stone wall near the river.
Is there anything unusual about this image? Yes: the man is ironing clothes on a taxi.
    indented   text with  several   spaces and tabs\tand new\nlines.
Numbers 0123456789 and punctuation: (a), [b], {c}; "quoted" 'single' - dash -- done!
""" * 3

# Strings that exercise the merges, spaces, digits, newlines, byte fallback (characters the
# corpus never saw), and text around special tokens.
STRINGS = [
    "",
    "Hello",
    " Hello",
    "hello world",
    "  two leading spaces",
    "trailing space ",
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "\nWhat is shown in this image? ASSISTANT:",
    "USER: hi ASSISTANT: hello</s>USER: and then? ASSISTANT:",
    "<s>[INST] question [/INST]",
    "Numbers 2023 and 3.14159, 1,000,000",
    "tabs\tand\nnewlines\n\n and    runs   of spaces",
    "Ünïcödé café naïve — “quotes” 日本語 한국어 🙂🚀",
    "<unk> is unknown",
    "zzzz qqqq xylophone",
]

VARIANTS = {
    "legacy-false": {"legacy": False},
    "legacy-true": {"legacy": True},
    "added-image-token": {"legacy": False, "added": "<image>"},
}


def train(dir: Path) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        max_sentence_length=4096,
    )
    (dir / "tokenizer.model").write_bytes(model.getvalue())


def tokenizer_config(variant: dict, vocab_size: int) -> dict:
    special = lambda content: {  # noqa: E731
        "content": content, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True,
    }
    decoder = {"0": special("<unk>"), "1": special("<s>"), "2": special("</s>")}
    if "added" in variant:
        decoder[str(vocab_size)] = special(variant["added"])
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": variant["legacy"],
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    model_dir = OUT / "model"
    model_dir.mkdir()
    train(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    expected = {
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "sentencepiece": spm.__version__},
        "vocab_size": sp.get_piece_size(),
        "strings": STRINGS,
        "sentencepiece_ids": [sp.encode(s) for s in STRINGS],
        "variants": {},
    }
    for name, variant in VARIANTS.items():
        dir = OUT / "variants" / name
        dir.mkdir(parents=True)
        shutil.copy(model_dir / "tokenizer.model", dir / "tokenizer.model")
        (dir / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(variant, sp.get_piece_size()), indent=2) + "\n")
        tok = AutoTokenizer.from_pretrained(dir)
        assert not (dir / "tokenizer.json").exists()
        with_bos = [tok(s).input_ids for s in STRINGS]
        without = [tok(s, add_special_tokens=False).input_ids for s in STRINGS]
        expected["variants"][name] = {
            "ids": with_bos,
            "ids_without_special": without,
            "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in without],
        }
    # Where the two prepend schemes part: text right after a special token.
    legacy = expected["variants"]["legacy-true"]["ids"]
    modern = expected["variants"]["legacy-false"]["ids"]
    assert legacy != modern, "the legacy flag should change some ids"
    # The BPE itself agrees with SentencePiece's wherever no special token is involved.
    for s, ours, ref in zip(STRINGS, expected["variants"]["legacy-false"]["ids_without_special"],
                            expected["sentencepiece_ids"]):
        if "<" not in s and ours != ref:
            print(f"note: transformers and sentencepiece differ on {s!r}: {ours} vs {ref}")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
