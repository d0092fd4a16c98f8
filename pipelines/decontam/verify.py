"""The second, stricter check on a hash candidate: re-aligned grey-level and gradient correlation plus structure.

Perceptual hashes keep only the signs of the lowest frequencies, so unrelated images of the same kind (a plane on
blue sky, a black frame, text on white) collide. A true copy, once the candidate's variant box is re-aligned by a
small local search, also agrees in its edges: the normalised correlation of the gradient images (``gncc``) is
high for copies and low for look-alikes, whose low-frequency layout agrees but whose details do not. Images with
too little structure (flat skies, blank or black frames) cannot be told apart by any hash and are never matched.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipelines.core.config import Config, check
from pipelines.decontam.align import block_agreement
from pipelines.decontam.variants import Variant


@dataclass(frozen=True)
class VerifyConfig(Config):
    size: int = 24  # side of the compared grey patches
    min_ncc: float = 0.85  # grey-level correlation after alignment
    min_gncc: float = 0.75  # gradient correlation after alignment (the discriminative part)
    min_std: float = 10.0  # grey-level standard deviation a patch needs (0..255 scale)
    min_grad: float = 4.0  # mean absolute gradient a patch needs
    refine_step: float = 0.03  # local search step, relative to the image side
    refine_steps: int = 1  # +-steps in x, y and scale
    min_blocks: float = 0.6  # local agreement of the compared patches (align.block_agreement)
    # Near-exact pairs: grey levels and gradients agreeing at least this closely need the contrast (min_std) but
    # only exact_min_grad of edge density. A plain shape on a smooth background (the synthetic web's held-out
    # drawings: mean gradient 2.8-3.9 at 24 px, std 15-37) is identifiable, yet fails min_grad. Set on synthetic
    # webs of seeds 1, 2, 4, 5 (benchmarks/dedup_synthweb.py): 18 of 20 such copies >= 0.99 / 0.97, no
    # look-alike's variant check >= 0.98 / 0.95.
    exact_ncc: float = 0.99
    exact_gncc: float = 0.97
    exact_min_grad: float = 2.0

    def __post_init__(self):
        check(isinstance(self.size, int) and 8 <= self.size <= 128, "verify_cfg.size", "expected an integer 8..128")
        for name in ("min_ncc", "min_gncc"):
            check(-1.0 <= getattr(self, name) <= 1.0, f"verify_cfg.{name}", "expected a correlation in -1..1")
        check(self.min_std >= 0 and self.min_grad >= 0, "verify_cfg.min_std/min_grad", "expected >= 0")
        check(0 < self.refine_step <= 0.25, "verify_cfg.refine_step", "expected 0 < step <= 0.25")
        check(isinstance(self.refine_steps, int) and 0 <= self.refine_steps <= 5, "verify_cfg.refine_steps",
              "expected an integer 0..5")
        check(0.0 <= self.min_blocks <= 1.0, "verify_cfg.min_blocks", "expected a fraction 0..1")


def patch(img: Image.Image, size: int, box_px=None) -> np.ndarray:
    """Grey ``size`` x ``size`` float32 patch of ``img`` (optionally of a pixel box with float corners)."""
    g = img if img.mode == "L" else img.convert("L")
    return np.asarray(g.resize((size, size), Image.Resampling.BILINEAR, box=box_px), dtype=np.float32)


def gradients(p: np.ndarray) -> np.ndarray:
    """Horizontal and vertical differences of (..., h, w) patches, flattened to (..., features)."""
    gx = np.diff(p, axis=-1).reshape(*p.shape[:-2], -1)
    gy = np.diff(p, axis=-2).reshape(*p.shape[:-2], -1)
    return np.concatenate([gx, gy], axis=-1)


def ncc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of flattened vectors along the last axis (a broadcasts against b)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    num = (a * b).sum(axis=-1)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1)) + 1e-6
    return num / den


def has_structure(p: np.ndarray, cfg: VerifyConfig, min_grad: float | None = None) -> bool:
    """Enough contrast and edges to be identifiable (rejects flat skies, blank and black frames)."""
    return float(p.std()) >= cfg.min_std and float(np.abs(gradients(p)).mean()) >= (
        cfg.min_grad if min_grad is None else min_grad)


def _boxes(v: Variant, w: int, h: int, cfg: VerifyConfig) -> list[tuple[float, float, float, float]]:
    """The variant's box and its local perturbations (shift x/y, scale about the centre), in pixels."""
    x0, y0, x1, y1 = v.box
    out = []
    k = range(-cfg.refine_steps, cfg.refine_steps + 1)
    for ds in k:
        for dx in k:
            for dy in k:
                s, ox, oy = ds * cfg.refine_step, dx * cfg.refine_step, dy * cfg.refine_step
                cx, cy = (x0 + x1) / 2 + ox, (y0 + y1) / 2 + oy
                hw, hh = (x1 - x0) / 2 * (1 + s), (y1 - y0) / 2 * (1 + s)
                a, b, c, d = max(0.0, cx - hw), max(0.0, cy - hh), min(1.0, cx + hw), min(1.0, cy + hh)
                if c - a > 0.3 and d - b > 0.3:
                    out.append((a * w, b * h, c * w, d * h))
    return out


def aligned_scores(eval_grey: Image.Image, v: Variant, query_patch: np.ndarray, cfg: VerifyConfig,
                   with_box: bool = False):
    """Best (ncc, gncc, eval patch) of ``query_patch`` against the eval region ``v`` names, over local
    re-alignments (the alignment maximising gncc + ncc / 2); ``with_box``: and that region, relative to the
    (mirrored, rotated) evaluation image."""
    img = ImageOps.mirror(eval_grey) if v.mirror else eval_grey
    if v.angle:
        img = img.rotate(v.angle, resample=Image.Resampling.BICUBIC)
    w, h = img.size
    boxes = _boxes(v, w, h, cfg)
    cands = np.stack([patch(img, cfg.size, b) for b in boxes])
    q = query_patch.reshape(-1)
    c = ncc(cands.reshape(len(cands), -1), q[None, :])
    g = ncc(gradients(cands), gradients(query_patch)[None, :])
    best = int(np.argmax(g + 0.5 * c))
    if with_box:
        x0, y0, x1, y1 = boxes[best]
        return float(c[best]), float(g[best]), cands[best], (x0 / w, y0 / h, x1 / w, y1 / h)
    return float(c[best]), float(g[best]), cands[best]


def passes(ncc_value: float, gncc_value: float, eval_patch: np.ndarray, query_patch: np.ndarray,
           cfg: VerifyConfig) -> bool:
    exact = ncc_value >= cfg.exact_ncc and gncc_value >= cfg.exact_gncc
    grad = cfg.exact_min_grad if exact else cfg.min_grad
    return (ncc_value >= cfg.min_ncc and gncc_value >= cfg.min_gncc
            and has_structure(eval_patch, cfg, grad) and has_structure(query_patch, cfg, grad)
            and block_agreement(eval_patch, query_patch) >= cfg.min_blocks)
