"""Drives `llava serve` with the official `openai` Python package (pip install openai): a plain
request, a streamed one with usage, and one with a data-URL image. It checks what the client
parses (ids, roles, finish reasons, usage) and that a refused parameter surfaces as the client's
BadRequestError. Run by hand against a running server; BENCHMARKS.md records a run.

    llava serve --model DIR --port 8080 --api-key sk-local &
    python3 tools/openai_client_check.py --base-url http://127.0.0.1:8080/v1 --api-key sk-local \
        --image tests/fixtures/models/images/small_24x20.png
"""

import argparse
import base64
import mimetypes
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--image", required=True)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"openai {openai.__version__}; model {model}")

    plain = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    choice = plain.choices[0]
    assert plain.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    print(f"plain: {choice.message.content!r} finish={choice.finish_reason} usage={plain.usage}")

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    ids, text, finish, usage, roles = set(), "", None, None, []
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices:
            delta = chunk.choices[0].delta
            roles.append(delta.role)
            text += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert len(ids) == 1, f"one id across the stream: {ids}"
    assert roles[0] == "assistant" and not any(roles[1:]), roles
    assert text == choice.message.content, (text, choice.message.content)
    assert usage == plain.usage, (usage, plain.usage)
    print(f"streamed: {text!r} finish={finish} usage={usage} (same as plain)")

    mime = mimetypes.guess_type(args.image)[0] or "image/png"
    with open(args.image, "rb") as f:
        url = f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"
    image = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is in the image?"},
                ],
            }
        ],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    print(f"image: {image.choices[0].message.content!r} usage={image.usage}")

    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], n=2
        )
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "n", e.body
        print(f"n=2: BadRequestError {e.status_code}, param {e.body['param']!r}")
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
