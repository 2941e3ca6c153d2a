#!/usr/bin/env python3
"""Make the image-preprocessing parity fixtures for `crates/llava-data` (run by hand, never in CI).

    /work/venv/bin/python tools/make_image_fixtures.py
    # optional: also record the torchvision ("fast") CLIPImageProcessor for comparison
    PYTHONPATH=/path/to/torchvision/site /work/venv/bin/python tools/make_image_fixtures.py

Writes small deterministic test images to tests/fixtures/images/ and, for each (image, processor
config, aspect mode, alpha mode) case, what HF transformers' PIL ("slow") CLIPImageProcessor
produces: `pixel_values` as little-endian f32 (CHW) under expected/, plus manifest.json.

Large outputs (224/336 px) are stored as (a) the uint8 image the processor normalised, as a PNG,
which pins the resampling to the last bit, and (b) a strided sample of the f32 values, which pins
the rescale/normalise arithmetic. Small outputs are stored whole. The fast (torchvision) outputs,
when recorded, are stored as the uint8 image they normalised (their f32 differs from the slow
formula applied to it by ~1e-7, from the fused rescale+normalise), to keep the fixtures small.

The reference pipeline is the one a user of transformers gets:
  load:    transformers.image_utils.load_image (PIL open, ImageOps.exif_transpose, convert("RGB"),
           which drops alpha without compositing)  -- alpha mode "drop"
           or the raw PIL image (after exif_transpose) handed straight to the processor, whose own
           convert_to_rgb composites transparency onto white -- alpha mode "composite"
  pad:     LLaVA's expand2square with tuple(int(x*255) for x in image_mean)
  process: CLIPImageProcessorPil (transformers 5.x name of the slow processor; CLIPImageProcessor
           with use_fast=False in 4.x)
"""

import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "images"
EXP = OUT / "expected"
FULL_LIMIT = 12_000  # store whole f32 tensors up to this many elements
SAMPLE_STRIDE = 101  # otherwise every 101st element (a prime, so it walks all channels/columns)

try:
    from transformers import CLIPImageProcessorPil as SlowProcessor  # transformers >= 5

    SLOW_KW = {}
except ImportError:  # transformers 4.x
    from transformers import CLIPImageProcessor as SlowProcessor

    SLOW_KW = {"use_fast": False}

FastProcessor = None
try:
    import torchvision  # noqa: F401

    if SLOW_KW:
        from transformers import CLIPImageProcessorFast as FastProcessor  # 4.x
    else:
        from transformers import CLIPImageProcessor as FastProcessor  # 5.x: the torchvision backend
except ImportError:
    pass


def rng(seed):
    return np.random.default_rng(seed)


def write_png16_rgb(path, arr):
    """PIL cannot write 16-bit RGB PNGs, so write one by hand (big-endian samples, filter 0)."""
    h, w, c = arr.shape
    assert c == 3 and arr.dtype == np.uint16
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def photo_like(w, h, seed):
    """Smooth gradients, a few hard edges and mild noise: enough texture to exercise the filter."""
    r = rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    img[..., 0] = 128 + 100 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    img[..., 1] = 255 * xx / max(w - 1, 1)
    img[..., 2] = 255 * (1 - yy / max(h - 1, 1))
    img[(xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2 < (min(w, h) * 0.2) ** 2] = [250, 240, 20]
    img[int(h * 0.7) : int(h * 0.8), int(w * 0.1) : int(w * 0.5)] = [10, 10, 200]
    img += r.normal(0, 6, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_images():
    OUT.mkdir(parents=True, exist_ok=True)
    imgs = {}

    a = rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    a = (0.5 * a + 0.5 * photo_like(64, 48, 2)).astype(np.uint8)
    Image.fromarray(a, "RGB").save(OUT / "rgb_64x48.png")
    imgs["rgb_64x48.png"] = "RGB 64x48, downscale to 30 + crop; upscale to 336"

    Image.fromarray(rng(3).integers(0, 256, (13, 20, 3), dtype=np.uint8), "RGB").save(OUT / "rgb_20x13.png")
    imgs["rgb_20x13.png"] = "RGB 20x13 noise, upscale"

    Image.fromarray(photo_like(300, 200, 4), "RGB").save(OUT / "photo_300x200.jpg", quality=85)
    imgs["photo_300x200.jpg"] = "photo-like JPEG (4:2:0), hard downscale"

    Image.fromarray(photo_like(96, 64, 5), "RGB").save(OUT / "photo444_96x64.jpg", quality=90, subsampling=0)
    imgs["photo444_96x64.jpg"] = "photo-like JPEG, 4:4:4 (no chroma upsampling)"

    rgba = np.concatenate(
        [photo_like(40, 50, 6), np.tile(np.linspace(0, 255, 40).astype(np.uint8), (50, 1))[..., None]], axis=2
    )
    rgba[:10, :, 3] = 0  # fully transparent band with non-zero colour underneath
    Image.fromarray(rgba, "RGBA").save(OUT / "rgba_40x50.png")
    imgs["rgba_40x50.png"] = "RGBA with an alpha ramp and a fully transparent band"

    pal = Image.fromarray(photo_like(33, 27, 7), "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    pal.save(OUT / "palette_33x27.png")
    imgs["palette_33x27.png"] = "palette (P) PNG, 16 colours"

    palt = pal.copy()
    palt.info["transparency"] = 3
    palt.save(OUT / "palette_trns_33x27.png", transparency=3)
    imgs["palette_trns_33x27.png"] = "palette PNG with a tRNS transparent index"

    Image.fromarray(photo_like(45, 31, 8)[..., 1], "L").save(OUT / "grey_45x31.png")
    imgs["grey_45x31.png"] = "greyscale L PNG"

    la = np.stack([photo_like(24, 24, 9)[..., 0], rng(10).integers(0, 256, (24, 24), dtype=np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(OUT / "grey_alpha_24x24.png")
    imgs["grey_alpha_24x24.png"] = "greyscale+alpha LA PNG"

    g16 = (rng(11).integers(0, 65536, (20, 30))).astype(np.uint16)
    g16[:, :10] = rng(12).integers(0, 256, (20, 10))  # some values < 256, which PIL keeps as is
    Image.fromarray(g16).save(OUT / "grey16_30x20.png")
    imgs["grey16_30x20.png"] = "16-bit greyscale PNG (PIL mode I;16)"

    write_png16_rgb(OUT / "rgb16_30x20.png", rng(13).integers(0, 65536, (20, 30, 3)).astype(np.uint16))
    imgs["rgb16_30x20.png"] = "16-bit RGB PNG (PIL keeps the high byte)"

    e = Image.fromarray(photo_like(40, 30, 14), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    e.save(OUT / "exif6_40x30.jpg", quality=92, exif=exif.tobytes())
    imgs["exif6_40x30.jpg"] = "JPEG stored 40x30 with EXIF orientation 6 (upright 30x40)"

    Image.fromarray(photo_like(24, 60, 15), "RGB").save(OUT / "tall_24x60.png")
    imgs["tall_24x60.png"] = "tall image for pad-to-square"

    Image.fromarray(photo_like(50, 22, 16), "RGB").save(OUT / "wide_50x22.png")
    imgs["wide_50x22.png"] = "wide image for pad-to-square"

    Image.fromarray(photo_like(31, 23, 17), "RGB").quantize(colors=32).save(OUT / "anim_31x23.gif")
    imgs["anim_31x23.gif"] = "GIF (palette)"

    Image.fromarray(photo_like(26, 34, 18), "RGB").save(OUT / "lossless_26x34.webp", lossless=True)
    imgs["lossless_26x34.webp"] = "lossless WebP"

    Image.fromarray(photo_like(35, 21, 19), "RGB").save(OUT / "bmp_35x21.bmp")
    imgs["bmp_35x21.bmp"] = "24-bit BMP"

    # Error-path fixtures.
    png = (OUT / "rgb_20x13.png").read_bytes()
    (OUT / "truncated.png").write_bytes(png[: len(png) // 2])
    (OUT / "not_an_image.png").write_bytes(b"this is a text file, not a PNG\n")
    return imgs


CONFIGS = {
    # The tiny test models use 30 px.
    "se30": {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}},
    # LLaVA-1.5's CLIP ViT-L/14-336.
    "se336": {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    # Odd sizes and the height/width form; crop larger than the resized image (zero padding).
    "hw_pad": {"size": {"height": 20, "width": 26}, "crop_size": {"height": 24, "width": 31}},
    # Old-style bare ints, an odd crop (exercises the crop offset rounding) and bilinear.
    "int_bilinear": {"size": 17, "crop_size": 15, "resample": 2},
    # The CLIP default config (224), downscale of the 300x200 photo.
    "se224": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},
}

CASES = [
    # (image, config, aspect, alpha)
    ("rgb_64x48.png", "se30", "square", "drop"),
    ("rgb_64x48.png", "hw_pad", "square", "drop"),
    ("rgb_64x48.png", "int_bilinear", "square", "drop"),
    ("rgb_20x13.png", "se30", "square", "drop"),
    ("rgb_20x13.png", "int_bilinear", "square", "drop"),
    ("photo_300x200.jpg", "se30", "square", "drop"),
    ("photo_300x200.jpg", "se224", "square", "drop"),
    ("photo_300x200.jpg", "se30", "pad", "drop"),
    ("photo444_96x64.jpg", "se30", "square", "drop"),
    ("rgba_40x50.png", "se30", "square", "drop"),
    ("rgba_40x50.png", "se30", "square", "composite"),
    ("palette_33x27.png", "se30", "square", "drop"),
    ("palette_trns_33x27.png", "se30", "square", "drop"),
    ("palette_trns_33x27.png", "se30", "square", "composite"),
    ("grey_45x31.png", "se30", "square", "drop"),
    ("grey_alpha_24x24.png", "se30", "square", "drop"),
    ("grey_alpha_24x24.png", "se30", "square", "composite"),
    ("grey16_30x20.png", "se30", "square", "drop"),
    ("rgb16_30x20.png", "se30", "square", "drop"),
    ("exif6_40x30.jpg", "se30", "square", "drop"),
    ("tall_24x60.png", "se30", "pad", "drop"),
    ("tall_24x60.png", "se336", "pad", "drop"),
    ("tall_24x60.png", "se30", "square", "drop"),
    ("wide_50x22.png", "se30", "pad", "drop"),
    ("anim_31x23.gif", "se30", "square", "drop"),
    ("lossless_26x34.webp", "se30", "square", "drop"),
    ("bmp_35x21.bmp", "se30", "square", "drop"),
]


def expand2square(pil_img, background_color):
    """Verbatim logic of LLaVA's llava/mm_utils.py expand2square."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def load(path, alpha):
    if alpha == "drop":
        return transformers.image_utils.load_image(str(path))
    img = Image.open(path)
    img = ImageOps.exif_transpose(img)
    img.load()
    return img


def main():
    EXP.mkdir(parents=True, exist_ok=True)
    for f in EXP.iterdir():
        f.unlink()
    images = make_images()

    manifest = {
        "generator": "tools/make_image_fixtures.py",
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "slow_processor": SlowProcessor.__name__,
        "fast_processor": None,
        "images": images,
        "configs": CONFIGS,
        "cases": [],
    }
    if FastProcessor is not None:
        import torchvision

        manifest["fast_processor"] = f"{FastProcessor.__name__} (torchvision {torchvision.__version__})"

    # The PIL-decoded pixels of each JPEG, so decode and preprocessing differences can be told apart.
    decoded = {}
    for name in images:
        if name.endswith(".jpg"):
            dec = transformers.image_utils.load_image(str(OUT / name))
            dec.save(EXP / f"{name}.decoded.png")
            decoded[name] = f"expected/{name}.decoded.png"
    manifest["decoded"] = decoded

    for image_name, cfg_name, aspect, alpha in CASES:
        cfg = CONFIGS[cfg_name]
        slow = SlowProcessor(**cfg, **SLOW_KW)
        img = load(OUT / image_name, alpha)
        if aspect == "pad":
            if alpha != "drop":
                raise SystemExit("pad is only defined after convert('RGB')")
            img = expand2square(img, tuple(int(x * 255) for x in slow.image_mean))
        pv = slow(img, return_tensors="np")["pixel_values"][0].astype(np.float32)
        assert pv.dtype == np.float32 and pv.ndim == 3 and pv.shape[0] == 3
        case = f"{Path(image_name).stem}_{Path(image_name).suffix[1:]}__{cfg_name}__{aspect}__{alpha}"
        entry = {
            "name": case,
            "image": image_name,
            "config": cfg_name,
            "aspect": aspect,
            "alpha": alpha,
            "shape": list(pv.shape),
        }

        # The uint8 image that was rescaled/normalised, recovered exactly (levels are ~0.015 apart).
        mean = np.array(slow.image_mean, np.float64)[:, None, None]
        std = np.array(slow.image_std, np.float64)[:, None, None]
        u8f = (pv.astype(np.float64) * std + mean) * 255.0
        u8 = np.round(u8f)
        assert np.abs(u8f - u8).max() < 1e-2, "pixel_values are not a function of a uint8 image"
        u8 = u8.clip(0, 255).astype(np.uint8)

        if pv.size <= FULL_LIMIT:
            (EXP / f"{case}.f32").write_bytes(pv.astype("<f4").tobytes())
            entry["f32"] = f"expected/{case}.f32"
            entry["f32_stride"] = 1
        else:
            (EXP / f"{case}.f32").write_bytes(pv.reshape(-1)[::SAMPLE_STRIDE].astype("<f4").tobytes())
            entry["f32"] = f"expected/{case}.f32"
            entry["f32_stride"] = SAMPLE_STRIDE
            Image.fromarray(np.moveaxis(u8, 0, -1), "RGB").save(EXP / f"{case}.u8.png", optimize=True)
            entry["u8_png"] = f"expected/{case}.u8.png"

        if FastProcessor is not None:
            fast = FastProcessor(**cfg)
            fimg = load(OUT / image_name, alpha)
            if aspect == "pad":
                fimg = expand2square(fimg, tuple(int(x * 255) for x in fast.image_mean))
            fpv = fast(fimg, return_tensors="np")["pixel_values"][0].astype(np.float32)
            if fpv.shape == pv.shape:
                entry["fast_vs_slow_max_abs"] = float(np.abs(fpv - pv).max())
                fu8f = (fpv.astype(np.float64) * std + mean) * 255.0
                fu8 = np.round(fu8f)
                assert np.abs(fu8f - fu8).max() < 1e-2, "fast pixel_values are not on the uint8 grid"
                fu8 = fu8.clip(0, 255).astype(np.uint8)
                if pv.size <= FULL_LIMIT:  # large ones: only the measured diff, to keep fixtures small
                    Image.fromarray(np.moveaxis(fu8, 0, -1), "RGB").save(EXP / f"{case}.fast.u8.png", optimize=True)
                    entry["fast_u8_png"] = f"expected/{case}.fast.u8.png"
            else:
                entry["fast_shape"] = list(fpv.shape)
        manifest["cases"].append(entry)
        print(f"{case:60s} {pv.shape} fast-vs-slow={entry.get('fast_vs_slow_max_abs')}")

    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {len(manifest['cases'])} cases, {total / 1024:.0f} KiB under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
