"""Soak test for `llava serve`, run by hand (BENCHMARKS.md, Serving): --duration seconds of mixed
clients against a running server, then its RSS after the first minute against the end (target:
within 10%) and every status by kind of client (target: no 5xx, and each kind gets its expected
status). Each minute's lowest and highest RSS are reported too, and the last minute's lowest must
be within 10% of the second minute's, so that one sample taken in a burst decides nothing.
Kinds: streamed and plain text requests, streams dropped after two chunks, a request with a small
valid image, and bad images (garbage base64, a decompression-bomb PNG, a data URL of the
wrong media type). Needs aiohttp; shares bench_serve.py's client.

    python tools/soak_serve.py --base-url http://127.0.0.1:8080 --server-pid PID --duration 600
"""

import argparse
import asyncio
import base64
import json
import random
import struct
import sys
import time
import zlib
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import Client, prompts, rss, sse_chunks  # noqa: E402


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20000) -> bytes:
    """A valid grayscale PNG of side x side pixels (400 MP at 20000) that compresses to ~400 KB."""
    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# kind: (weight, statuses it may get)
KINDS = {
    "stream": (30, {200, 429}),
    "plain": (15, {200, 429}),
    "disconnect": (20, {200, 429}),
    "image": (3, {200, 429}),
    "bad_base64": (10, {400}),
    "bomb_png": (6, {400}),
    "wrong_media_type": (10, {400}),
}


async def one(kind: str, client: Client, session, rng, images, args) -> str:
    text = rng.choice(images["prompts"])
    body = client.body(text, args.max_tokens)
    if kind == "plain":
        body["stream"] = False
        body.pop("stream_options")
    bad = {
        "image": images["valid"],
        "bad_base64": "data:image/png;base64,!!not*base64@@" + "A" * rng.randint(0, 64),
        "bomb_png": images["bomb"],
        "wrong_media_type": images["pdf"],
    }.get(kind)
    if bad:
        body["messages"][0]["content"] = [
            {"type": "image_url", "image_url": {"url": bad}},
            {"type": "text", "text": text},
        ]
    url = f"{client.base}/v1/chat/completions"
    async with session.post(url, json=body, headers=client.headers) as resp:
        status = resp.status
        if status != 200:
            await resp.read()
            return str(status)
        if kind == "plain":
            reply = await resp.json()
            return "200" if reply["choices"][0]["message"]["content"] is not None else "200-empty"
        chunks = 0
        async for chunk in sse_chunks(resp):
            if chunk is None:
                return "200"
            if "error" in chunk:
                return f"stream-error {chunk['error'].get('type')}"
            chunks += 1
            if kind == "disconnect" and chunks >= 2:
                resp.close()  # drops the connection mid-stream
                return "200"
        return "200-no-done"


async def main_async(args) -> int:
    client = Client(args)
    rng = random.Random(args.seed)
    with open(args.valid_image, "rb") as f:
        valid = f.read()
    images = {
        "prompts": prompts(16, args.seed),
        "valid": data_url("image/png", valid),
        "bomb": data_url("image/png", bomb_png()),
        "pdf": data_url("application/pdf", b"%PDF-1.4\n" + bytes(rng.randrange(256) for _ in range(512))),
    }
    counts: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    samples = []
    start = time.perf_counter()
    end = start + args.duration
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.read_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        if not client.model:
            async with session.get(f"{client.base}/v1/models", headers=client.headers) as r:
                client.model = (await r.json())["data"][0]["id"]

        async def worker(seed):
            wrng = random.Random(seed)
            while time.perf_counter() < end:
                kind = wrng.choices(kinds, weights)[0]
                try:
                    status = await one(kind, client, session, wrng, images, args)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    status = f"client-error {type(e).__name__}"
                counts[kind][status] = counts[kind].get(status, 0) + 1
                if status == "429":
                    await asyncio.sleep(1)

        async def sampler():
            while time.perf_counter() < end:
                samples.append({"t": round(time.perf_counter() - start, 1), **rss(args.server_pid)})
                await asyncio.sleep(args.sample_every)

        await asyncio.gather(sampler(), *[worker(args.seed * 1000 + i) for i in range(args.clients)])
        async with session.get(f"{client.base}/health") as r:
            health = r.status
        async with session.get(f"{client.base}/metrics", headers=client.headers) as r:
            metrics = await r.text()
    final = rss(args.server_pid)
    after_minute = next((s for s in samples if s["t"] >= 60), samples[-1] if samples else {})
    growth = None
    if after_minute.get("VmRSS") and final.get("VmRSS"):
        growth = round(final["VmRSS"] / after_minute["VmRSS"] - 1, 4)
    # RSS follows the load (the server hands back memory a burst took), so one sample can
    # land on a peak or a trough. Each minute's lowest and highest reading show the trend
    # apart from that: a leak lifts the floor.
    by_minute = []
    for m in range(int(args.duration // 60)):
        v = [s["VmRSS"] for s in samples if m * 60 <= s["t"] < (m + 1) * 60 and "VmRSS" in s]
        if v:
            by_minute.append([min(v), max(v)])
    floor_growth = None
    if len(by_minute) >= 3:
        floor_growth = round(by_minute[-1][0] / by_minute[1][0] - 1, 4)
    unexpected = {
        kind: {s: n for s, n in got.items() if not (s.isdigit() and int(s) in KINDS[kind][1])}
        for kind, got in counts.items()
    }
    unexpected = {k: v for k, v in unexpected.items() if v}
    five_xx = sum(n for got in counts.values() for s, n in got.items() if s.startswith("5"))
    report = {
        "phase": "soak",
        "label": args.label,
        "duration_s": args.duration,
        "clients": args.clients,
        "requests": sum(sum(v.values()) for v in counts.values()),
        "counts": counts,
        "five_xx": five_xx,
        "unexpected": unexpected,
        "health_after": health,
        "rss_mib_after_first_minute": after_minute.get("VmRSS"),
        "rss_mib_end": final.get("VmRSS"),
        "rss_growth": growth,
        "rss_mib_by_minute": by_minute,
        "rss_floor_growth_from_minute_2": floor_growth,
        "peak_rss_mib": final.get("VmHWM"),
        "rss_samples": samples,
        "metrics_requests": [l for l in metrics.splitlines() if l.startswith("llava_requests_total")],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(report) + "\n")
    ok = (five_xx == 0 and not unexpected and health == 200 and growth is not None and abs(growth) <= 0.10
          and (floor_growth is None or floor_growth <= 0.10))
    print("soak passed" if ok else "soak FAILED")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--model")
    ap.add_argument("--api-key")
    ap.add_argument("--label", default="")
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--valid-image", default="tests/fixtures/models/images/shapes_64x48.png")
    ap.add_argument("--sample-every", type=float, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--read-timeout", type=float, default=600)
    ap.add_argument("--out")
    args = ap.parse_args()
    # bench_serve's Client: no server-specific fields, no image on every request (the kinds
    # choose theirs).
    args.extra_body = None
    args.image = None
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
