"""What the scripts that take a llava-hf checkpoint apart for llama.cpp share
(tools/extract_llava_lm.py, tools/extract_llava_mmproj.py): their two arguments and the
checkpoint's config, and its tensor names whichever transformers version wrote them."""

import json
import sys
from pathlib import Path

# The modules transformers 5 writes under `model.`, and transformers 4 at the top level.
MODULES = ("language_model.", "vision_tower.", "multi_modal_projector.")


def source_and_destination(doc: str) -> tuple[Path, Path, dict] | None:
    """SRC and DST from `script SRC DST`, and SRC's config.json; None, with `doc` printed as the
    usage, when the arguments are not two."""
    if len(sys.argv) != 3:
        print(doc, file=sys.stderr)
        return None
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    return src, dst, json.loads((src / "config.json").read_text())


def llava_name(stored: str) -> str:
    """A llava-hf tensor name in transformers 4's layout: `model.language_model.…`,
    `model.vision_tower.…` and `model.multi_modal_projector.…` (transformers 5) lose `model.`."""
    rest = stored.removeprefix("model.")
    return rest if stored.startswith("model.") and rest.startswith(MODULES) else stored
