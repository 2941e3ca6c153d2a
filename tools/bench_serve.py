"""Load benchmark for an OpenAI-compatible chat server (`llava serve`, llama.cpp's `llama-server`),
run by hand (never in CI); BENCHMARKS.md's Serving section records its runs. tools/bench_serve.sh
starts the servers and calls it. Needs aiohttp (pip install aiohttp).

Phases (each prints one JSON line; --out collects them):
- reference: every prompt once, one request at a time, greedy and streamed: each prompt's
  unbatched answer.
- load: --clients concurrent streaming clients share --requests requests (bounded also by
  --time-limit). Reports requests/s, aggregate generated tokens/s, p50/p99 time to first token,
  per-token latency (each request's (last - first token time) / (tokens - 1)) and inter-chunk
  gaps, the server's peak RSS, every status (a 429 waits its Retry-After and is sent again, and
  is counted), and how many answers differ from the reference.
- streams: decode throughput with 1 stream and with 8 concurrent ones (same short prompt, same
  --stream-tokens): the tokens that arrive while every stream of the set is decoding, over that
  window.

    python tools/bench_serve.py --base-url http://127.0.0.1:8080 --server-pid PID \
        --phases reference,load,streams --out /tmp/serve-ours.json
"""

import argparse
import asyncio
import base64
import json
import random
import statistics
import sys
import time

import aiohttp

WORDS = (
    "the a small red blue green square circle triangle picture image left right above below "
    "shows near far large tiny bright dark corner middle edge top bottom what where how many "
    "colour shape is are there in of on"
).split()


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` questions of varied length (about 20 to 150 characters: the tiny-1b tokenizer is
    character-level, so about as many tokens), the same for every server."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = 2 + int((i / max(n - 1, 1)) ** 2 * 24)
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(f"Question {i}: {text}?")
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def rss(pid: int | None) -> dict:
    """The server's current and peak resident set (VmRSS, VmHWM), in MiB."""
    if not pid:
        return {}
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


class Client:
    def __init__(self, args):
        self.base = args.base_url.rstrip("/")
        self.model = args.model
        self.extra = json.loads(args.extra_body) if args.extra_body else {}
        self.image_url = None
        if args.image:
            with open(args.image, "rb") as f:
                data = base64.b64encode(f.read()).decode()
            self.image_url = f"data:image/png;base64,{data}"
        self.headers = {"Content-Type": "application/json"}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"

    def body(self, prompt: str, max_tokens: int, image: bool = False) -> dict:
        content = prompt
        if image and self.image_url:
            content = [
                {"type": "image_url", "image_url": {"url": self.image_url}},
                {"type": "text", "text": prompt},
            ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update(self.extra)
        return body

    async def stream(self, session, body: dict) -> dict:
        """One streamed request: status, text, chunk arrival times, usage."""
        t0 = time.perf_counter()
        rec = {"t0": t0, "status": None, "text": "", "times": [], "usage": None}
        async with session.post(
            f"{self.base}/v1/chat/completions", json=body, headers=self.headers
        ) as resp:
            rec["status"] = resp.status
            if resp.status != 200:
                rec["error"] = (await resp.text())[:300]
                rec["retry_after"] = float(resp.headers.get("Retry-After", "1"))
                return rec
            async for chunk in sse_chunks(resp):
                if chunk is None:
                    break
                if "error" in chunk:
                    rec["status"] = "stream-error"
                    rec["error"] = json.dumps(chunk["error"])[:300]
                    break
                if chunk.get("usage"):
                    rec["usage"] = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        rec["text"] += piece
                        rec["times"].append(time.perf_counter())
        rec["t_end"] = time.perf_counter()
        return rec


async def sse_chunks(resp):
    """The JSON objects of a server-sent event stream, then None for `data: [DONE]`."""
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)


def completion_tokens(rec: dict) -> int:
    if rec.get("usage") and rec["usage"].get("completion_tokens") is not None:
        return rec["usage"]["completion_tokens"]
    return len(rec["times"])


async def reference(client: Client, session, texts, args) -> dict:
    answers = []
    for text in texts:
        rec = await client.stream(session, client.body(text, args.max_tokens, args.with_image))
        if rec["status"] != 200:
            raise SystemExit(f"reference request failed: {rec['status']} {rec.get('error')}")
        answers.append(rec["text"])
        print(
            f"  reference {len(answers)}/{len(texts)}: {completion_tokens(rec)} tokens",
            file=sys.stderr,
        )
    return {"phase": "reference", "answers": answers}


async def load(client: Client, session, texts, refs, args) -> dict:
    jobs = asyncio.Queue()
    for i in range(args.requests):
        jobs.put_nowait(i % len(texts))
    done: list[dict] = []
    statuses: dict[str, int] = {}
    deadline = time.perf_counter() + args.time_limit
    start = time.perf_counter()

    async def worker():
        while time.perf_counter() < deadline:
            try:
                i = jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            while True:
                try:
                    rec = await client.stream(
                        session, client.body(texts[i], args.max_tokens, args.with_image)
                    )
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    rec = {"status": f"client-error {type(e).__name__}", "error": str(e)}
                key = str(rec["status"])
                statuses[key] = statuses.get(key, 0) + 1
                if rec["status"] == 429 and time.perf_counter() < deadline:
                    await asyncio.sleep(rec.get("retry_after", 1))
                    continue
                break
            rec["prompt"] = i
            done.append(rec)

    tasks = [asyncio.create_task(worker()) for _ in range(args.clients)]
    _, pending = await asyncio.wait(tasks, timeout=args.time_limit + 5)
    for t in pending:
        t.cancel()
    wall = time.perf_counter() - start
    ok = [r for r in done if r["status"] == 200]
    tokens = sum(completion_tokens(r) for r in ok)
    ttft = [r["times"][0] - r["t0"] for r in ok if r["times"]]
    tpot = [
        (r["times"][-1] - r["times"][0]) / (completion_tokens(r) - 1)
        for r in ok
        if len(r["times"]) > 1 and completion_tokens(r) > 1
    ]
    gaps = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    mismatches = []
    if refs is not None:
        for r in ok:
            if r["text"] != refs[r["prompt"]]:
                mismatches.append(
                    {"prompt": r["prompt"], "got": r["text"][:80], "want": refs[r["prompt"]][:80]}
                )
    prompt_tokens = [r["usage"]["prompt_tokens"] for r in ok if r.get("usage")]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "phase": "load",
        "clients": args.clients,
        "requests": args.requests,
        "finished": len(done),
        "unfinished": args.requests - len(done),
        "statuses": statuses,
        "ok": len(ok),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "generated_tokens": tokens,
        "generated_tokens_per_s": round(tokens / wall, 2),
        "mean_prompt_tokens": round(statistics.mean(prompt_tokens), 1) if prompt_tokens else None,
        "ttft_ms_p50": ms(percentile(ttft, 0.5)),
        "ttft_ms_p99": ms(percentile(ttft, 0.99)),
        "tpot_ms_p50": ms(percentile(tpot, 0.5)),
        "tpot_ms_p99": ms(percentile(tpot, 0.99)),
        "itl_ms_p50": ms(percentile(gaps, 0.5)),
        "itl_ms_p99": ms(percentile(gaps, 0.99)),
        "compared": len(ok) if refs is not None else 0,
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:3],
        "errors": [r.get("error") for r in done if r["status"] not in (200, 429)][:3],
    }


async def streams(client: Client, session, n: int, args) -> dict:
    """`n` streams started together on one short prompt; decode tokens per second while all
    `n` decode at once (chunks counted, scaled to tokens where a chunk held several)."""
    text = "Describe the picture in detail."
    recs = await asyncio.gather(
        *[client.stream(session, client.body(text, args.stream_tokens)) for _ in range(n)]
    )
    bad = [r for r in recs if r["status"] != 200 or len(r["times"]) < 2]
    if bad:
        return {"phase": f"streams-{n}", "error": [r.get("error") or r["status"] for r in bad]}
    lo = max(r["times"][0] for r in recs)
    hi = min(r["times"][-1] for r in recs)
    window = hi - lo
    tokens = 0.0
    for r in recs:
        per_chunk = (completion_tokens(r) - 1) / (len(r["times"]) - 1)
        tokens += per_chunk * sum(1 for t in r["times"][1:] if lo < t <= hi)
    return {
        "phase": f"streams-{n}",
        "streams": n,
        "window_s": round(window, 2),
        "decode_tokens_per_s": round(tokens / window, 2) if window > 0 else None,
        "per_stream_tokens": [completion_tokens(r) for r in recs],
        "answers_equal": len({r["text"] for r in recs}) == 1,
    }


async def main_async(args) -> int:
    client = Client(args)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.read_timeout)
    # A connection per request: llama-server closes idle keep-alive connections, and a reused
    # one it has closed fails the next request's write.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    results = []
    texts = prompts(args.prompts, args.seed)
    refs = None
    if args.reference_file:
        try:
            with open(args.reference_file) as f:
                refs = json.load(f)["answers"]
        except FileNotFoundError:
            pass
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if not args.model:
            async with session.get(f"{args.base_url.rstrip('/')}/v1/models", headers=client.headers) as r:
                client.model = (await r.json())["data"][0]["id"]
        for phase in args.phases.split(","):
            if phase == "reference":
                out = await reference(client, session, texts, args)
                refs = out["answers"]
                if args.reference_file:
                    with open(args.reference_file, "w") as f:
                        json.dump(out, f)
                out = {"phase": "reference", "prompts": len(refs)}
            elif phase == "load":
                out = await load(client, session, texts, refs, args)
            elif phase == "streams":
                for n in (1, args.streams):
                    out = await streams(client, session, n, args)
                    out.update(rss(args.server_pid))
                    out["label"] = args.label
                    print(json.dumps(out), flush=True)
                    results.append(out)
                continue
            else:
                raise SystemExit(f"unknown phase {phase}")
            out.update(rss(args.server_pid))
            out["label"] = args.label
            print(json.dumps(out), flush=True)
            results.append(out)
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    failed = any(
        r.get("mismatches")
        or r.get("error")
        or any(k not in ("200", "429") for k in r.get("statuses", {}))
        for r in results
    )
    return 1 if failed and args.strict else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", help="default: the first of /v1/models")
    ap.add_argument("--api-key")
    ap.add_argument("--label", default="", help="a name for the server in the output")
    ap.add_argument("--server-pid", type=int, help="read its RSS and peak RSS from /proc")
    ap.add_argument("--phases", default="reference,load,streams")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the load phase")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream-tokens", type=int, default=64, help="max_tokens of the streams phase")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--image", help="a PNG sent with every reference and load request")
    ap.add_argument("--read-timeout", type=float, default=600)
    ap.add_argument("--reference-file", help="where the reference answers are kept (JSON)")
    ap.add_argument("--extra-body", help="JSON merged into every request (server-specific fields)")
    ap.add_argument("--out", help="append each phase's JSON line to this file")
    ap.add_argument("--strict", action="store_true", help="exit 1 on a mismatch or a status other than 200/429")
    args = ap.parse_args()
    args.with_image = bool(args.image)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
