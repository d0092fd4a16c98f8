"""Planted contamination of the synthetic web: transformed copies of held-out evaluation images served as web pages.

Real evaluation images leak onto the web re-encoded, resized, cropped, mirrored, padded or recoloured (CLIP paper,
section 5); a web with such copies, labelled, lets the demo and the tests show what decontamination catches.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pipelines.synthweb.drawing import encode_jpeg

# The transform families a planted copy is drawn from (deterministically, per row).
TRANSFORMS: tuple[str, ...] = ("reencode", "resize", "jpeg_low", "centre_crop", "mirror", "pad", "colour_shift")


def transform_copy(jpeg: bytes, transform: str, rng: np.random.Generator) -> bytes:
    """A web copy of an evaluation JPEG under ``transform`` (one of :data:`TRANSFORMS`), as JPEG bytes."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown contamination transform {transform!r}; expected one of {TRANSFORMS}")
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if transform == "reencode":  # the same picture saved again, at an ordinary web quality
        return encode_jpeg(img, quality=int(rng.integers(75, 91)))
    if transform == "resize":  # a thumbnail or an upscaled copy
        s = float(rng.choice([rng.uniform(0.55, 0.85), rng.uniform(1.2, 1.5)]))
        size = (max(16, round(img.width * s)), max(16, round(img.height * s)))
        return encode_jpeg(img.resize(size, Image.LANCZOS))
    if transform == "jpeg_low":
        return encode_jpeg(img, quality=int(rng.integers(30, 61)))
    if transform == "centre_crop":  # keeps 85-95% of each side
        f = float(rng.uniform(0.85, 0.95))
        w, h = round(img.width * f), round(img.height * f)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        return encode_jpeg(img.crop((left, top, left + w, top + h)))
    if transform == "mirror":
        return encode_jpeg(ImageOps.mirror(img))
    if transform == "pad":  # a frame of 4-12% of the short side, white, black or grey
        border = max(2, round(min(img.size) * float(rng.uniform(0.04, 0.12))))
        fill = [(255, 255, 255), (0, 0, 0), (128, 128, 128)][int(rng.integers(0, 3))]
        return encode_jpeg(ImageOps.expand(img, border=border, fill=fill))
    # colour_shift: slight, so the concept's colour name still fits
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.88, 1.12)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.85, 1.15)))
    shift = rng.integers(-10, 11, size=3)
    arr = np.clip(np.asarray(img, dtype=np.int16) + shift, 0, 255).astype(np.uint8)
    return encode_jpeg(Image.fromarray(arr, "RGB"))
