"""Labelled copy transforms that web re-uploads apply (resize, JPEG, crop, mirror, rotate, pad, recolour, grey, banner,
small shifts, stronger colour shifts, re-crops scaled back to size).

Used to plant known near-duplicates in the quality benchmark and the tests, and as the synthetic augmentations the
optional near-duplicate embedding is trained on (CLIP appendix C). Every transform takes an RGB PIL image and a
``numpy.random.Generator`` so a seed fixes the result.
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Transform = Callable[[Image.Image, np.random.Generator], Image.Image]

WORDS = ["SALE", "look", "best deal", "wow", "new", "photo", "follow me", "LOL", "free", "click", "2019", "share"]


def _resize_by(img: Image.Image, f: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC)


def resize(img, rng):
    """Down- or up-scale (x0.75 .. x4), keeping the aspect ratio."""
    return _resize_by(img, float(rng.choice([rng.uniform(0.75, 0.95), rng.uniform(1.5, 4.0)])))


def jpeg(img, rng):
    """Re-encode as JPEG at quality 10..30."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(10, 31)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop(img, rng):
    """Keep 80..95% of each side at a random position (not resized back)."""
    w, h = img.size
    fw, fh = rng.uniform(0.80, 0.95), rng.uniform(0.80, 0.95)
    cw, ch = max(4, round(w * fw)), max(4, round(h * fh))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def mirror(img, rng):
    """Horizontal flip."""
    return ImageOps.mirror(img)


def rotate(img, rng):
    """Rotate by 2..8 degrees either way about the centre, corners filled with a solid colour."""
    angle = float(rng.uniform(2.0, 8.0) * rng.choice([-1, 1]))
    fill = tuple(int(v) for v in rng.choice([[0, 0, 0], [255, 255, 255], [128, 128, 128]]))
    return img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=fill)


def pad(img, rng):
    """Add a solid border of 5..25% of the side (per side), as letterboxing and framing do."""
    w, h = img.size
    l, t, r, b = (int(round(s * rng.uniform(0.05, 0.25))) for s in (w, h, w, h))
    fill = tuple(int(v) for v in rng.choice([[0, 0, 0], [255, 255, 255], rng.integers(0, 256, 3)]))
    out = Image.new("RGB", (w + l + r, h + t + b), fill)
    out.paste(img, (l, t))
    return out


def colour(img, rng):
    """Brightness, contrast and saturation shifts of up to +-30% and a hue rotation of up to +-20 degrees."""
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.75, 1.3)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.6, 1.4)))
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-14, 15))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def grayscale(img, rng):
    """Drop colour (kept as a 3-channel image, as re-uploads do)."""
    return img.convert("L").convert("RGB")


def banner(img, rng):
    """Upscale x4 and overlay a caption strip of 12..20% of the height at the top or bottom."""
    big = _resize_by(img, 4.0)
    w, h = big.size
    bh = max(6, int(round(h * rng.uniform(0.12, 0.20))))
    fill = tuple(int(v) for v in rng.choice([[255, 255, 255], [0, 0, 0], [200, 30, 30]]))
    ink = (0, 0, 0) if sum(fill) > 384 else (255, 255, 255)
    y0 = 0 if rng.random() < 0.5 else h - bh
    draw = ImageDraw.Draw(big)
    draw.rectangle((0, y0, w, y0 + bh), fill=fill)
    text = " ".join(rng.choice(WORDS, size=2))
    font = ImageFont.load_default(size=max(8, int(bh * 0.7)))
    draw.text((int(w * 0.05), y0 + bh * 0.1), text, fill=ink, font=font)
    return big


def shift(img, rng):
    """Translate by 1..4 px at 32 px (scaled with the image side; the larger offset is at least 1 px), the vacated
    border filled by reflection or edge pixels: how two crops of one larger photo a few pixels apart look."""
    w, h = img.size
    k = max(w, h) / 32.0
    while True:
        dx, dy = (int(v) for v in rng.integers(-4, 5, 2))
        if max(abs(dx), abs(dy)) >= 1:
            break
    dx, dy = int(round(dx * k)), int(round(dy * k))
    a = np.asarray(img)
    mode = "reflect" if rng.random() < 0.5 else "edge"
    pad = np.pad(a, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode=mode)
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return Image.fromarray(np.ascontiguousarray(pad[y0:y0 + h, x0:x0 + w]))


def colour_shift(img, rng):
    """White balance (per-channel gains 0.7..1.3), hue rotation up to +-40 degrees, saturation x0.4..1.6 and
    gamma 0.7..1.4: a re-coloured copy (filters, other colour profile)."""
    a = np.asarray(img, dtype=np.float32) * rng.uniform(0.7, 1.3, 3)
    a = 255.0 * (np.clip(a, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.4, 1.6)))
    hsv = np.asarray(out.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-28, 29))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def recrop(img, rng):
    """Keep 70..100% of each side (independently: the aspect changes) at a random place, scaled back to the
    original size: the same photo cropped differently, as small datasets' near-duplicates often are."""
    w, h = img.size
    fw, fh = rng.uniform(0.70, 1.0), rng.uniform(0.70, 1.0)
    cw, ch = max(4, round(w * fw)), max(4, round(h * fh))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)


TRANSFORMS: dict[str, Transform] = {
    "resize": resize,
    "jpeg": jpeg,
    "crop": crop,
    "mirror": mirror,
    "rotate": rotate,
    "pad": pad,
    "colour": colour,
    "grayscale": grayscale,
    "banner": banner,
    "shift": shift,
    "colour_shift": colour_shift,
    "recrop": recrop,
}


def apply(name: str, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return TRANSFORMS[name](img.convert("RGB"), rng)
