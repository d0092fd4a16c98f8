"""Pillow's LANCZOS resize of an 8-bit grey image, bit for bit, as two cached matrix products.

imagehash resizes with ``Image.resize(size, LANCZOS)``. Pillow (``libImaging/Resample.c``) computes, per output
pixel, double-precision filter weights, rounds them to 22-bit fixed point, sums ``pixel * weight`` in integers
from ``1 << 21`` and shifts right by 22 (clipped to 0..255): a horizontal pass, then a vertical pass on the
8-bit result (vertical first for an image more than 100 times taller than wide that shrinks in height:
``Image.resize`` does that). Here the same fixed-point weights are computed once per (input size, output size) with the same
double arithmetic (Python's floats and ``math.sin`` are C doubles and the C library's ``sin``), and each pass is a
float64 matrix product: every product and sum is an integer below 2**53, so BLAS computes them exactly, and the
shift is an exact division by a power of two. For a 128 px thumbnail this takes ~40 us against Pillow's ~160 us
for the two hash sizes, mostly Pillow recomputing its weights on every call.

Pillow's weights can only come out differently if its C compiler contracted a multiply-add into an FMA, which
Python does not; :func:`resize_grey` therefore checks its first result for each (input, output) size against
Pillow and uses Pillow for that size from then on if they differ (counted in :data:`MISMATCHED`). Tests compare
hundreds of sizes against Pillow.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits of pixel, 2 of headroom
_HALF = float(1 << (PRECISION_BITS - 1))
_SCALE = 1.0 / (1 << PRECISION_BITS)
_MAX_CACHE = 4096

_lock = threading.Lock()
_weights: dict[tuple[int, int], np.ndarray] = {}  # (in_size, out_size) -> (out_size, in_size) float64 fixed point
_stacked: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
_checked: dict[tuple, bool] = {}  # (w, h, sizes) -> the matrices matched Pillow
MISMATCHED: set[tuple] = set()  # (w, h, sizes) where the matrices differed from Pillow


def _lanczos(x: float) -> float:
    # Resample.c: lanczos_filter (support 3) of sinc_filter
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def fixed_point_weights(in_size: int, out_size: int) -> np.ndarray:
    """Resample.c's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for LANCZOS over the whole input
    (box 0..in_size): an (out_size, in_size) matrix of the integer weights, as float64."""
    key = (in_size, out_size)
    w = _weights.get(key)
    if w is not None:
        return w
    support_base = 3.0
    scale = filterscale = in_size / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = support_base * filterscale
    out = np.zeros((out_size, in_size), dtype=np.float64)
    one = float(1 << PRECISION_BITS)
    for xx in range(out_size):
        center = 0 + (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = int(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        k = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in k:
            ww += v
        if ww != 0.0:
            k = [v / ww for v in k]
        # normalize_coeffs_8bpc: C's (int) truncates toward zero
        out[xx, xmin:xmin + xmax] = [float(int(-0.5 + v * one)) if v < 0 else float(int(0.5 + v * one))
                                     for v in k]
    with _lock:
        if len(_weights) >= _MAX_CACHE:
            _weights.clear()
        _weights[key] = out
    return out


def _horizontal_weights(in_w: int, out_ws: tuple[int, ...]) -> np.ndarray:
    """The weights of several horizontal passes side by side, transposed: (in_w, sum(out_ws))."""
    key = (in_w, out_ws)
    w = _stacked.get(key)
    if w is None:
        w = np.ascontiguousarray(np.concatenate([fixed_point_weights(in_w, o) for o in out_ws]).T)
        with _lock:
            if len(_stacked) >= _MAX_CACHE:
                _stacked.clear()
            _stacked[key] = w
    return w


def _fixed(ss: np.ndarray) -> np.ndarray:
    """Resample.c's clip8 of (1 << 21) + sum: floor(ss / 2**22) clipped to 0..255, in place."""
    ss += _HALF
    np.multiply(ss, _SCALE, out=ss)
    np.floor(ss, out=ss)
    np.clip(ss, 0.0, 255.0, out=ss)
    return ss


def _horizontal_first(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = a.shape
    if size[0] != w:
        a = _fixed(a @ fixed_point_weights(w, size[0]).T)
    if size[1] != h:
        a = _fixed(fixed_point_weights(h, size[1]) @ a)
    return a.astype(np.uint8)


def _tall(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = a.shape
    a = _fixed(fixed_point_weights(h, size[1]) @ a)
    if size[0] != w:
        a = _fixed(a @ fixed_point_weights(w, size[0]).T)
    return a.astype(np.uint8)


def resize_grey_exact(grey: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """``Image.fromarray(grey).resize(size, LANCZOS)`` for each ``size`` = (w, h), as uint8 (h, w) arrays,
    computed with matrices (the horizontal passes of all sizes in one product). Not checked against Pillow
    (see :func:`resize_grey`)."""
    h, w = grey.shape
    a = grey.astype(np.float64)
    if h > w * 100:  # Image.resize: a very tall image shrinking in height is resized vertically first
        return [_tall(a, size) if size[1] < h else _horizontal_first(a, size) for size in sizes]
    out_ws = tuple(dict.fromkeys(s[0] for s in sizes if s[0] != w))  # Resample.c: need_horizontal
    across = {w: a}
    if out_ws:
        ss = _fixed(a @ _horizontal_weights(w, out_ws))
        start = 0
        for o in out_ws:
            across[o] = ss[:, start:start + o]
            start += o
    out = []
    for out_w, out_h in sizes:
        b = across[out_w]
        if out_h != h:  # need_vertical, on the 8-bit result of the horizontal pass
            b = _fixed(fixed_point_weights(h, out_h) @ b)
        out.append(b.astype(np.uint8))
    return out


def resize_grey(img: Image.Image, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """An "L" image resized to each of ``sizes`` with LANCZOS, equal to Pillow's ``img.resize(size, LANCZOS)``:
    the matrix path, checked against Pillow on the first image of each (input size, output sizes); Pillow itself
    for a size where they differed."""
    grey = np.asarray(img, dtype=np.uint8)
    h, w = grey.shape
    key = (w, h, tuple(sizes))
    ok = _checked.get(key)
    if ok is False:
        return [np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.uint8) for size in sizes]
    mine = resize_grey_exact(grey, sizes)
    if ok is None:
        ref = [np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.uint8) for size in sizes]
        same = all(np.array_equal(r, m) for r, m in zip(ref, mine))
        with _lock:
            if len(_checked) >= _MAX_CACHE:
                _checked.clear()
            _checked[key] = same
            if not same:
                MISMATCHED.add(key)
        return ref
    return mine
