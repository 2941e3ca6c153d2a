"""The PyTorch side of the demo's learning-rate check (BENCHMARKS.md, "The offline demo").

Trains transformers' LLaVA on the demo's random-weight checkpoint for the simplest task that needs
the picture: name the colour of the only object. Every weight trains (as in the demo's stage 0),
AdamW, global-norm clip 1.0, constant learning rate, batches of 16, llava_v1 prompt. Prints the
loss every 10 steps; chance is about 0.9 (log 6 over the colour token, plus `</s>`).

    llava demo --out /tmp/demo --stop-after init
    python3 - <<'EOF'   # colour.json: the one-object training scenes
    import json
    sc = [json.loads(l) for l in open('/tmp/demo/world/scenes_train.jsonl')]
    recs = [{"id": s["id"], "image": s["file_name"], "conversations": [
        {"from": "human", "value": "<image>\\nWhat colour?"},
        {"from": "gpt", "value": s["objects"][0]["colour"]}]} for s in sc if len(s["objects"]) == 1]
    json.dump(recs, open('/tmp/colour.json', 'w'))
    EOF
    python tools/colour_task_pytorch.py --model /tmp/demo/init --data /tmp/colour.json \
        --images /tmp/demo/world/images --lr 3e-4 --steps 100
    llava train --stage finetune --unfreeze-vision --model /tmp/demo/init --data /tmp/colour.json \
        --image-folder /tmp/demo/world/images --output /tmp/colour --max-steps 100 --batch-size 16 \
        --lr 3e-4 --lr-scheduler constant --warmup-ratio 0 --template llava_v1
"""

import argparse
import json
import random

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import LlavaForConditionalGeneration

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
IMAGE, PAD, EOS, IMAGE_TOKENS = 4, 3, 2, 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(a.model, torch_dtype=torch.float32)
    tok = Tokenizer.from_file(f"{a.model}/tokenizer.json")
    records = json.load(open(a.data))

    def pixels(name):
        x = np.asarray(Image.open(f"{a.images}/{name}").convert("RGB"), dtype=np.float32) / 255.0
        return torch.tensor((x - MEAN) / STD, dtype=torch.float32).permute(2, 0, 1)

    def sample(r):
        prompt = tok.encode(f"{SYSTEM} USER: <image>\nWhat colour? ASSISTANT:").ids
        answer = tok.encode(" " + r["conversations"][1]["value"], add_special_tokens=False).ids + [EOS]
        at = prompt.index(IMAGE)
        ids = prompt[:at] + [IMAGE] * IMAGE_TOKENS + prompt[at + 1:] + answer
        return ids, [-100] * (len(ids) - len(answer)) + answer

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    for step in range(a.steps):
        batch = random.sample(records, a.batch)
        samples = [sample(r) for r in batch]
        n = max(len(s[0]) for s in samples)
        ids = torch.tensor([s[0] + [PAD] * (n - len(s[0])) for s in samples])
        labels = torch.tensor([s[1] + [-100] * (n - len(s[1])) for s in samples])
        mask = torch.tensor([[1] * len(s[0]) + [0] * (n - len(s[0])) for s in samples])
        out = model(input_ids=ids, attention_mask=mask, labels=labels,
                    pixel_values=torch.stack([pixels(r["image"]) for r in batch]),
                    vision_feature_layer=-2, vision_feature_select_strategy="default")
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            print(step, round(out.loss.item(), 3), flush=True)


if __name__ == "__main__":
    main()
