"""Robustness variants: the crops/flips/rotations indexed per evaluation image and the trims applied to a query.

A copy that was cropped, flipped, rotated, padded or captioned hashes far from its source. Rather than one hash
per image, the index holds hashes of the evaluation image as such edits would leave it (mirror x full, centre and
corner crops at 90% and 85%, top/bottom 80% strips, small rotations with the corners cropped away), and a query is
hashed as found, with its solid border trimmed, and as the strips/centre that survive a caption banner or a
rotation. Each variant is a box in relative coordinates so that the verifier can re-align the pair exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class Variant:
    name: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) relative to the image
    mirror: bool = False
    angle: float = 0.0  # degrees, counter-clockwise, applied before the box


def _eval_variants() -> list[Variant]:
    out = []
    for mirror in (False, True):
        pre = "mirror+" if mirror else ""
        out.append(Variant(f"{pre}full", (0.0, 0.0, 1.0, 1.0), mirror))
        for f in (0.90, 0.85):
            m = 1.0 - f
            places = {"c": (m / 2, m / 2), "tl": (0, 0), "tr": (m, 0), "bl": (0, m), "br": (m, m),
                      "t": (m / 2, 0), "b": (m / 2, m), "l": (0, m / 2), "r": (m, m / 2)}
            for where, (x, y) in places.items():
                out.append(Variant(f"{pre}crop{int(f * 100)}-{where}", (x, y, x + f, y + f), mirror))
        out.append(Variant(f"{pre}top80", (0.0, 0.0, 1.0, 0.8), mirror))
        out.append(Variant(f"{pre}bottom80", (0.0, 0.2, 1.0, 1.0), mirror))
        for a in (-6.0, -3.0, 3.0, 6.0):
            out.append(Variant(f"{pre}rot{a:+.0f}", (0.125, 0.125, 0.875, 0.875), mirror, a))
    return out


EVAL_VARIANTS: list[Variant] = _eval_variants()
# Query variants are taken from the border-trimmed query; "asis" is the untrimmed image.
QUERY_VARIANTS: list[Variant] = [
    Variant("asis", (0.0, 0.0, 1.0, 1.0)),
    Variant("trim", (0.0, 0.0, 1.0, 1.0)),
    Variant("trim+top80", (0.0, 0.0, 1.0, 0.8)),
    Variant("trim+bottom80", (0.0, 0.2, 1.0, 1.0)),
    Variant("trim+centre75", (0.125, 0.125, 0.875, 0.875)),
]
# Which eval variants a query variant may be compared with in verification: a strip only with the same strip,
# the centre only with the rotations, the full query with everything else.
COMPATIBLE = {
    "asis": {v.name for v in EVAL_VARIANTS if "rot" not in v.name and not v.name.endswith(("top80", "bottom80"))},
    "trim": {v.name for v in EVAL_VARIANTS if "rot" not in v.name and not v.name.endswith(("top80", "bottom80"))},
    "trim+top80": {v.name for v in EVAL_VARIANTS if v.name.endswith("top80")},
    "trim+bottom80": {v.name for v in EVAL_VARIANTS if v.name.endswith("bottom80")},
    "trim+centre75": {v.name for v in EVAL_VARIANTS if "rot" in v.name or v.name.endswith("full")},
}


def apply_variant(img: Image.Image, v: Variant, box=None) -> Image.Image:
    """The region of ``img`` a variant names (``box`` overrides the variant's box, for re-alignment)."""
    if v.mirror:
        img = ImageOps.mirror(img)
    if v.angle:
        img = img.rotate(v.angle, resample=Image.Resampling.BICUBIC)
    x0, y0, x1, y1 = box or v.box
    w, h = img.size
    if (x0, y0, x1, y1) == (0.0, 0.0, 1.0, 1.0):
        return img
    return img.crop((round(x0 * w), round(y0 * h), max(round(x1 * w), round(x0 * w) + 1),
                     max(round(y1 * h), round(y0 * h) + 1)))


def border_box(img: Image.Image, tol: int = 12, min_frac: float = 0.02) -> tuple[int, int, int, int] | None:
    """The pixel box :func:`trim_border` keeps, or None when it keeps the image whole."""
    a = np.asarray(img.convert("L"), dtype=np.int16)
    if a.shape[0] < 4 or a.shape[1] < 4:
        return None
    edge = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    differs = np.abs(a - np.median(edge)) > tol
    rows = np.flatnonzero(differs.mean(axis=1) > min_frac)
    cols = np.flatnonzero(differs.mean(axis=0) > min_frac)
    if len(rows) == 0 or len(cols) == 0:
        return None  # uniform image: nothing to trim to
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    if (box[2] - box[0]) < a.shape[1] * 0.3 or (box[3] - box[1]) < a.shape[0] * 0.3:
        return None  # the "content" would be a small blob: not a border, keep the image whole
    return box


def trim_border(img: Image.Image, tol: int = 12, min_frac: float = 0.02) -> Image.Image:
    """Crop away a solid border (padding, letterbox, frame): rows/columns where almost nothing differs from the
    border colour (the median of the outermost pixels) by more than ``tol`` grey levels."""
    box = border_box(img, tol, min_frac)
    return img if box is None else img.crop(box)


def variant_region(img: Image.Image, index: int) -> tuple[float, float, float, float]:
    """The region of ``img`` (relative coordinates) that query variant ``index`` (:data:`QUERY_VARIANTS`) shows."""
    if index == 0:
        return (0.0, 0.0, 1.0, 1.0)
    w, h = img.size
    box = border_box(img)
    tx0, ty0, tx1, ty1 = (0.0, 0.0, 1.0, 1.0) if box is None else (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
    vx0, vy0, vx1, vy1 = QUERY_VARIANTS[index].box
    tw, th = tx1 - tx0, ty1 - ty0
    return (tx0 + vx0 * tw, ty0 + vy0 * th, tx0 + vx1 * tw, ty0 + vy1 * th)


def query_variants(img: Image.Image) -> list[Image.Image]:
    """The query images hashed for one pool image, in :data:`QUERY_VARIANTS` order."""
    trimmed = trim_border(img)
    return [img] + [apply_variant(trimmed, v) for v in QUERY_VARIANTS[1:]]
