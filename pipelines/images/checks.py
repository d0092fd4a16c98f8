"""Pure image checks: decode, minimum size and aspect ratio, each returning a reject reason; plus exact hashes.

Compute, then decide: :func:`inspect_image` decodes once (truncated or corrupt bytes fail here) and returns the
measurements; :func:`check_size` and
:func:`check_aspect` decide from those numbers alone, so tuning a threshold never decodes again.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

from pipelines.core import reasons
from pipelines.decontam.hashing import PHASH_SIZE
from pipelines.images.fast_hash import DECODES

# Reject reasons of the images stage (the one vocabulary in pipelines.core.reasons; counted in the funnel).
DECODE_ERROR = reasons.DECODE_ERROR
TOO_LARGE = reasons.TOO_LARGE
TOO_SMALL = reasons.TOO_SMALL
BAD_ASPECT = reasons.BAD_ASPECT_RATIO
EXACT_DUP = reasons.EXACT_DUPLICATE
NEAR_DUP = reasons.NEAR_DUPLICATE
MISSING_IMAGE = "missing_image"


@dataclass(frozen=True)
class ImageInfo:
    """What one decode tells: size, format, and the decoded (possibly reduced) image for hashing."""

    width: int
    height: int
    format: str | None
    image: Image.Image | None  # None when the decode failed
    error: str | None = None  # the reason when it failed


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inspect_image(data: bytes, *, max_pixels: int = 64_000_000, reduced: bool = False,
                  hash_side: int = PHASH_SIZE, decode: str = "exact") -> ImageInfo:
    """Decode ``data`` and report its size, or the failure reason.

    The header's size is checked against ``max_pixels`` before any pixel is decoded (decompression bombs).
    ``decode`` (``pipelines.images.fast_hash.DECODES``) says how a JPEG is decoded for hashing: ``"exact"`` fully
    (hashes equal imagehash's), ``"luma"`` its luma channel at full size, ``"reduced"`` (or ``reduced=True``) luma
    at the smallest DCT scale >= ``hash_side`` px (``Image.draft``). Every mode reads every entropy-coded block, so
    each is a full integrity check; the faster ones change pHash in a few bits on some images
    (docs/benchmarks_images.md). ``width``/``height`` are always the stored image's size.
    """
    if reduced:
        decode = "reduced"
    if decode not in DECODES:
        raise ValueError(f"inspect_image: decode must be one of {DECODES}, got {decode!r}")
    if not data:
        return ImageInfo(0, 0, None, None, DECODE_ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return ImageInfo(width, height, img.format, None, TOO_LARGE)
            fmt = img.format
            if fmt == "JPEG" and decode == "reduced":
                img.draft("L", (hash_side, hash_side))
            elif fmt == "JPEG" and decode == "luma":
                img.draft("L", (width, height))  # libjpeg skips chroma IDCT, upsampling and colour conversion
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return ImageInfo(0, 0, None, None, TOO_LARGE)
    except Exception:  # noqa: BLE001 - any decoder failure is a bad record, not a crash
        return ImageInfo(0, 0, None, None, DECODE_ERROR)
    if width <= 0 or height <= 0:
        return ImageInfo(width, height, fmt, None, DECODE_ERROR)
    return ImageInfo(width, height, fmt, img)


def check_size(width: int, height: int, min_side: int) -> str | None:
    """None (keep) when the shorter side is at least ``min_side`` pixels, else the reason."""
    return TOO_SMALL if min(width, height) < min_side else None


def check_aspect(width: int, height: int, max_aspect: float) -> str | None:
    """None (keep) when long side / short side is at most ``max_aspect``, else the reason."""
    return BAD_ASPECT if max(width, height) > max_aspect * min(width, height) else None
