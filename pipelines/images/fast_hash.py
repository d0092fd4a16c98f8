"""pHash and dHash of a batch of images from one decode each, with Pillow's LANCZOS resize done as matrix products.

imagehash spends most of its time in Pillow's LANCZOS resize (a 256 px image shrunk to 32x32 reads ~49 source
pixels per output, in scalar C) and in the full RGB decode; the DCT is small. Here the resize is the same
fixed-point arithmetic as Pillow's ``Resample.c`` expressed as two matrix products per group of same-sized images
(horizontal pass, round to uint8, vertical pass, round), so BLAS does it, bit-equal to Pillow, and pHash (32x32)
and dHash (9x8) share one horizontal product. The DCT, median and threshold run once per batch
(``pipelines.decontam.hashing``).

Three decodes, chosen by ``decode`` (measured in docs/benchmarks_images.md):

- ``"exact"``: full decode and Pillow's own ``convert("L")``, float64 products whose integer sums are exact, so
  the hashes equal imagehash's bit for bit.
- ``"luma"``: a JPEG decodes straight to its luma channel at full size (``Image.draft("L", size)``: libjpeg skips
  the chroma IDCT, upsampling and colour conversion). Luma differs from ``convert("L")`` of the decoded RGB by a
  rounding step, and by more where saturated colours clip in RGB, so a few hash bits can differ.
- ``"reduced"``: luma at libjpeg's smallest DCT scale whose shorter side is >= ``reduced_min_side`` px; fastest,
  least faithful.

Non-JPEG images take the exact route in every mode (no reduced decode exists for them).
"""
from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from pipelines.decontam.hashing import PHASH_SIZE, dhash64_from_grey, phash64_from_grey

DECODES = ("exact", "luma", "reduced")
REDUCED_MIN_SIDE = 64  # "reduced": smallest JPEG scale keeping both sides >= this (32 measured far worse)
DHASH_W, DHASH_H = 9, 8  # imagehash.dhash(hash_size=8) resizes to (9, 8)
PRECISION_BITS = 32 - 8 - 2  # Pillow Resample.c, 8 bits per channel
_HALF = float(1 << (PRECISION_BITS - 1))
_SCALE = 1.0 / (1 << PRECISION_BITS)
LANCZOS_SUPPORT = 3.0


@dataclass(frozen=True)
class HashBatch:
    """Per-image results, in input order: pHash and dHash as uint64 (imagehash's bit order), decoded size."""

    phash: np.ndarray
    dhash: np.ndarray
    width: np.ndarray
    height: np.ndarray


def _lanczos(x: np.ndarray) -> np.ndarray:
    # Pillow's lanczos_filter: sinc(x) * sinc(x / 3) on the half-open support [-3, 3), with sinc(0) = 1.
    def sinc(v):
        pv = v * math.pi
        return np.where(v == 0.0, 1.0, np.sin(pv) / np.where(v == 0.0, 1.0, pv))

    return np.where((x >= -LANCZOS_SUPPORT) & (x < LANCZOS_SUPPORT), sinc(x) * sinc(x / 3.0), 0.0)


@lru_cache(maxsize=4096)
def lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of Pillow's fixed-point LANCZOS coefficients (integers, scale 2**22).

    Mirrors ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` of Pillow's Resample.c: support widened by the
    downscale factor, window bounds rounded the same way, weights normalised to sum 1, then rounded half away
    from zero to 22 fractional bits. Products of these integers with uint8 pixels sum exactly in float64.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"lanczos_matrix: sizes must be >= 1, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    ss = 1.0 / filterscale
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) cast truncates toward zero; Pillow then clamps the window to the image.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    x = xmin[:, None] + np.arange(int((xmax - xmin).max()))[None, :]
    inside = x < xmax[:, None]
    w = np.where(inside, _lanczos((x - center[:, None] + 0.5) * ss), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=w, where=total != 0.0)
    fixed = np.trunc(w * (1 << PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    m = np.zeros((out_size, in_size))
    rows = np.broadcast_to(np.arange(out_size)[:, None], x.shape)
    m[rows[inside], x[inside]] = fixed[inside]
    return m


@lru_cache(maxsize=1024)
def _horizontal(width: int) -> np.ndarray:
    # One product serves both hashes: columns 0..31 for pHash, 32..40 for dHash.
    both = np.concatenate([lanczos_matrix(width, PHASH_SIZE), lanczos_matrix(width, DHASH_W)])
    return np.ascontiguousarray(both.T)


@lru_cache(maxsize=1024)
def _vertical(height: int) -> tuple[np.ndarray, np.ndarray]:
    return lanczos_matrix(height, PHASH_SIZE), lanczos_matrix(height, DHASH_H)


def _round_clip(acc: np.ndarray) -> np.ndarray:
    # Pillow's clip8: (sum + 2**21) >> 22, clamped to 0..255.
    out = np.floor((acc + _HALF) * _SCALE)
    return np.clip(out, 0, 255, out=out)


def resize_for_hashes(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, h, w) uint8 grey images of one size -> ((n, 32, 32), (n, 8, 9)) uint8, bit-equal to Pillow's LANCZOS.

    float64 on purpose: every product and sum is an integer below 2**53, so the result is exact whatever order
    BLAS sums in, hence the same on every machine and for every batch composition (float32 would be faster but
    its rounding would depend on the BLAS kernel and on which images share a product).
    """
    g = np.asarray(grey)
    if g.ndim != 3 or g.dtype != np.uint8:
        raise ValueError(f"resize_for_hashes: expected (n, h, w) uint8, got {g.dtype} {g.shape}")
    n, h, w = g.shape
    tmp = _round_clip(g.reshape(n * h, w).astype(np.float64) @ _horizontal(w)).reshape(n, h, -1)
    vp, vd = _vertical(h)
    small_p = _round_clip(np.matmul(vp, tmp[:, :, :PHASH_SIZE])).astype(np.uint8)
    small_d = _round_clip(np.matmul(vd, tmp[:, :, PHASH_SIZE:])).astype(np.uint8)
    return small_p, small_d


def hashes_from_grey(greys: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """pHash and dHash (uint64) of 2-D uint8 grey arrays of any sizes; images of one size share the products."""
    n = len(greys)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    small_p = np.empty((n, PHASH_SIZE, PHASH_SIZE), np.uint8)
    small_d = np.empty((n, DHASH_H, DHASH_W), np.uint8)
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, g in enumerate(greys):
        if g.ndim != 2 or g.dtype != np.uint8 or 0 in g.shape:
            raise ValueError(f"hashes_from_grey: image {i}: expected a non-empty 2-D uint8 array, got {g.dtype} "
                             f"{g.shape}")
        by_shape[g.shape].append(i)
    for idx in by_shape.values():
        p, d = resize_for_hashes(np.stack([greys[i] for i in idx]))
        small_p[idx], small_d[idx] = p, d
    return phash64_from_grey(small_p), dhash64_from_grey(small_d)


def grey_array(img: Image.Image) -> np.ndarray:
    """The 2-D uint8 array imagehash resizes: ``img.convert("L")`` (Pillow's own conversion, so it is exact)."""
    return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)


def open_for_hash(data: bytes, decode: str = "exact",
                  reduced_min_side: int = REDUCED_MIN_SIDE) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes for hashing -> (image, stored (width, height)); raises what Pillow raises on bad bytes.

    ``luma``/``reduced`` set a JPEG's draft mode before loading: every entropy-coded block is still read, so a
    truncated or corrupt file still fails here. The size returned is the header's, not the reduced decode's.
    """
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    img = Image.open(io.BytesIO(data))
    size = img.size
    if img.format == "JPEG" and decode != "exact":
        # Pillow picks the largest scale 1/2^k whose result still covers the requested box.
        img.draft("L", size if decode == "luma" else (reduced_min_side, reduced_min_side))
    img.load()
    return img, size


def hashes_from_images(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """pHash and dHash (uint64) of decoded PIL images; for fully decoded images they equal imagehash's."""
    return hashes_from_grey([grey_array(im) for im in images])


def hashes_from_jpeg_bytes(datas: Sequence[bytes], decode: str = "luma",
                           reduced_min_side: int = REDUCED_MIN_SIDE) -> HashBatch:
    """pHash, dHash, width and height of each image's bytes (JPEG or anything Pillow reads).

    ``decode="exact"`` gives imagehash's hashes bit for bit; ``"luma"`` (default) and ``"reduced"`` are faster
    and close (agreement rates in docs/benchmarks_images.md). Width and height are the stored image's, not the
    reduced decode's. Raises ``ValueError`` naming the index of an image that does not decode.
    """
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    images, widths, heights = [], [], []
    for i, data in enumerate(datas):
        try:
            img, (w, h) = open_for_hash(data, decode, reduced_min_side)
        except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ... for bad bytes
            raise ValueError(f"hashes_from_jpeg_bytes: image {i} does not decode: {e}") from e
        images.append(img)
        widths.append(w)
        heights.append(h)
    ph, dh = hashes_from_images(images)
    return HashBatch(ph, dh, np.array(widths, np.int64), np.array(heights, np.int64))
