"""Colour-aware final check of a pair a grey check accepted: the hue turn a re-colouring would need, and whether the
evaluation image's edges are all still there in the query, region by region.

The grey checks (:mod:`verify`, :mod:`align`) cannot tell a copy from a look-alike drawn with the same silhouette at
the same place: in grey both correlate at 0.95+ with the evaluation image (the synthetic web's drawings of one
concept: same shape and colour near the same place, another background). What a person sees at once is the
colour and the faint structure around the subject. Measured on the pair as the grey check aligned it (same
geometry, mirror and rotation, a caption banner's rows left out), on 32 x 32 colour samples over the WHOLE query
(:func:`sample_frame`: what a border trim cut away is compared too wherever it lands on the evaluation image):

- **hue turn** (:func:`hue_turn`): the rotation of the chroma plane (RGB minus its grey axis) that best maps the
  evaluation image's centred chroma onto the query's, after grey-world balancing of each side (a white-balance
  change is undone), refitted twice on the 80 % of samples it explains best (a banner's fill, a frame are left
  out). A re-coloured copy turns its hues coherently by what re-colouring does; an orange ring where the
  evaluation image has a purple one, a blue cross for a green one, needs a far larger turn. Undefined (not
  checked) when either side is nearly grey (a greyscale copy, a greyscale evaluation set).
- **edge recall** and **edge blocks**: the evaluation image's edge samples (colour-gradient magnitude of lightly
  smoothed samples >= EDGE_REL of its 95th percentile; luminance only when either side is nearly grey) that have
  a query edge within one sample: overall (``edge_recall``) and the share of the 4 x 4 blocks holding evaluation
  edges that keep at least half of theirs (``edge_blocks``). A copy keeps its source's edges wherever it overlaps
  it (noise and JPEG blocks may *add* edges, so precision is only reported); a look-alike lacks the faint ones in
  whole regions: the wall and floor behind the subject.

Both run only on pairs a grey check accepted: a few milliseconds per pair. Thresholds: DetectorConfig.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipelines.decontam.align import _sample

COLOUR_THUMB = 32  # side of the stored colour evaluation thumbnail
GRID = 32  # samples per side compared
EDGE_REL = 0.1  # edge pixel: gradient >= this fraction of the image's 95th-percentile gradient
MIN_CHROMA = 6.0  # RMS chroma (0..255 scale) below which a side counts as grey
EDGE_BLOCKS = 4
BLOCK_MIN_EDGES = 4
BLOCK_RECALL = 0.5
MIN_EDGES = 8  # fewer evaluation edge pixels than this: no evidence either way (recall 1.0)
# Chroma axes orthogonal to grey (1, 1, 1)/sqrt(3): a hue rotation is a rotation in this plane.
_U = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], np.float32) / np.array([[np.sqrt(2.0)], [np.sqrt(6.0)]], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class ColourScore:
    hue_turn: float | None  # degrees, None when either side is nearly grey
    edge_recall: float
    grey: bool  # compared in luminance only
    edge_precision: float = 1.0  # share of the query's edges found in the evaluation image (reported, not checked)
    edge_blocks: float = 1.0  # share of the EDGE_BLOCKS x EDGE_BLOCKS blocks with evaluation edges where most are kept

    def passes(self, max_hue_turn: float, min_edge_recall: float, min_edge_blocks: float = 0.0) -> bool:
        return ((self.hue_turn is None or self.hue_turn <= max_hue_turn) and self.edge_recall >= min_edge_recall
                and self.edge_blocks >= min_edge_blocks)

    def describe(self) -> str:
        hue = "grey" if self.hue_turn is None else f"{self.hue_turn:.0f}deg"
        return f"hue={hue} edges={self.edge_recall:.2f} edge_blocks={self.edge_blocks:.2f}"


def colour_thumb(img: Image.Image) -> np.ndarray:
    """(COLOUR_THUMB, COLOUR_THUMB, 3) uint8 colour thumbnail of an evaluation image (antialiased resize)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return np.asarray(rgb.resize((COLOUR_THUMB, COLOUR_THUMB), Image.Resampling.BILINEAR), np.uint8)


def query_grid(img: Image.Image, n: int = GRID) -> np.ndarray:
    """(n, n, 3) float32 samples of a query image over its whole frame."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return np.asarray(rgb.resize((n, n), Image.Resampling.BILINEAR), np.float32)


def sample_frame(thumb: np.ndarray, hyp: tuple[float, float, float, float], region: tuple[float, float, float, float],
                 trimmed: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0), keep: tuple[float, float] = (0.0, 1.0),
                 mirror: bool = False, angle: float = 0.0, n: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Colour samples (n, n, 3) of an evaluation thumbnail at an n x n grid over the WHOLE query image, and their
    validity (n, n).

    A grey check compared ``region`` of the query (relative box: the query variant, e.g. the border-trimmed image)
    with the evaluation image (mirrored and rotated by ``angle`` as its variant names), under ``hyp`` = (sx, sy, tx,
    ty): region coordinate g maps to evaluation coordinate t + s g. That map is extended to the whole query, so
    what a border trim left out is compared too wherever it lands on the evaluation image: a padded copy's border
    lands outside it (not compared), a look-alike's plain background trimmed away as a "border" lands on the
    source's wall and floor (compared, and missing their edges). Points inside the ``trimmed`` box but outside
    ``region`` (a strip variant) or outside the ``keep`` rows of ``region`` (a caption banner) are not compared."""
    img = Image.fromarray(np.asarray(thumb, np.uint8), "RGB")
    inside = None
    if mirror:
        img = ImageOps.mirror(img)
    if angle:
        img = img.rotate(angle, resample=Image.Resampling.BICUBIC)
        inside = np.asarray(Image.new("L", img.size, 255).rotate(angle, resample=Image.Resampling.BILINEAR),
                            np.float32)
    a = np.asarray(img, np.float32)
    rx0, ry0, rx1, ry1 = region
    sx, sy, tx, ty = (float(v) for v in hyp)
    w, h = max(rx1 - rx0, 1e-6), max(ry1 - ry0, 1e-6)
    full = np.array([[sx / w, sy / h, tx - sx / w * rx0, ty - sy / h * ry0]], np.float32)
    chans = [_sample(np.ascontiguousarray(a[..., c]), full, n) for c in range(3)]
    ev, valid = np.stack([v[0] for v, _ in chans], axis=-1), chans[0][1][0].copy()
    if inside is not None:
        valid &= _sample(inside, full, n)[0][0] > 250
    g = (np.arange(n, dtype=np.float32) + 0.5) / n
    ly = (g - ry0) / h
    in_t = ((g >= trimmed[0]) & (g <= trimmed[2]))[None, :] & ((g >= trimmed[1]) & (g <= trimmed[3]))[:, None]
    in_r = (((g >= rx0) & (g <= rx1))[None, :] & ((g >= ry0) & (g <= ry1))[:, None]
            & ((ly >= keep[0]) & (ly <= keep[1]))[:, None])
    return ev, valid & ~(in_t & ~in_r)


def _grad(x: np.ndarray) -> np.ndarray:
    """Per-sample gradient magnitude (max of the forward differences' norms) of (n, n, c) samples."""
    g = np.zeros(x.shape[:2], np.float32)
    gx = np.sqrt(((x[:, 1:] - x[:, :-1]) ** 2).sum(-1))
    gy = np.sqrt(((x[1:] - x[:-1]) ** 2).sum(-1))
    g[:, :-1] = gx
    g[:-1] = np.maximum(g[:-1], gy)
    return g


def _smooth(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[1 2 1]/4 smoothing along both axes of (n, n, c) samples (normalised over ``mask``): JPEG block edges and
    the finest texture, which a heavily compressed copy loses or gains, stop counting as edges."""
    w = np.ones(x.shape[:2], np.float64) if mask is None else mask.astype(np.float64)
    xs = x * w[..., None]

    def blur(v):
        p = np.pad(v, [(1, 1), (1, 1)] + [(0, 0)] * (v.ndim - 2), mode="edge")
        v = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
        return (v[:, :-2] + 2 * v[:, 1:-1] + v[:, 2:]) / 4

    return blur(xs) / np.maximum(blur(w[..., None]), 1e-6)


def _dilate(b: np.ndarray) -> np.ndarray:
    o = b.copy()
    o[1:] |= b[:-1]
    o[:-1] |= b[1:]
    o[:, 1:] |= b[:, :-1]
    o[:, :-1] |= b[:, 1:]
    return o


def _erode(b: np.ndarray) -> np.ndarray:
    o = b.copy()
    o[1:] &= b[:-1]
    o[:-1] &= b[1:]
    o[:, 1:] &= b[:, :-1]
    o[:, :-1] &= b[:, 1:]
    o[0], o[-1], o[:, 0], o[:, -1] = False, False, False, False
    return o


def _chroma_rms(x: np.ndarray) -> float:
    c = x @ _U.T.astype(np.float64)
    return float(np.sqrt(((c - c.mean(axis=0)) ** 2).sum(1).mean()))


def hue_turn(E: np.ndarray, Q: np.ndarray, keep: float = 0.8, rounds: int = 2) -> float:
    """Degrees by which the query's chroma is turned against the evaluation image's (k, 3 colour samples each,
    corresponding): 2-D Procrustes of the centred chroma after grey-world balancing of each side (per-channel
    gains that equalise the channel means: a white-balance change turns the hues of a muted photo by tens of
    degrees and is undone so); then refitted ``rounds`` times on the ``keep`` share of samples it explains best,
    so that a caption banner or a frame is left out."""
    u = _U.T.astype(np.float64)
    idx = np.arange(len(E))
    theta = 0.0
    for r in range(rounds + 1):
        # balance and centre on the samples kept: a banner's fill must not set the white balance either
        me, mq = E[idx].mean(axis=0), Q[idx].mean(axis=0)
        ce = (E * (me.mean() / np.maximum(me, 1.0))) @ u
        cq = (Q * (mq.mean() / np.maximum(mq, 1.0))) @ u
        ce -= ce[idx].mean(axis=0)
        cq -= cq[idx].mean(axis=0)
        a, b = ce[idx], cq[idx]
        cross, dot = float((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum()), float((a * b).sum())
        theta = float(np.arctan2(cross, dot))
        if r == rounds:
            break
        c, s_ = np.cos(theta), np.sin(theta)
        rot = np.stack([c * ce[:, 0] - s_ * ce[:, 1], s_ * ce[:, 0] + c * ce[:, 1]], axis=1)
        scale = float((rot * cq).sum()) / max(float((rot * rot).sum()), 1e-9)
        res = ((cq - scale * rot) ** 2).sum(1)
        idx = np.argsort(res, kind="stable")[: max(8, int(keep * len(res)))]
    return round(abs(float(np.degrees(theta))), 2)


def compare(ev: np.ndarray, q: np.ndarray, mask: np.ndarray | None = None) -> ColourScore:
    """Hue turn and edge recall of aligned colour samples ``ev``, ``q`` (n, n, 3; 0..255) over ``mask``."""
    m = np.ones(ev.shape[:2], bool) if mask is None else mask
    inner = _erode(m)
    if inner.sum() < 16:
        return ColourScore(None, 0.0, True)
    E, Q = ev[m].astype(np.float64), q[m].astype(np.float64)
    se, sq = _chroma_rms(E), _chroma_rms(Q)
    grey = min(se, sq) < MIN_CHROMA
    hue = None if grey else hue_turn(E, Q)
    a, b = (ev @ _LUMA)[..., None], (q @ _LUMA)[..., None]
    if not grey:
        a, b = ev, q
    ge, gq = _grad(_smooth(np.where(m[..., None], a, 0.0), m)), _grad(_smooth(b))
    te = EDGE_REL * max(float(np.quantile(ge[inner], 0.95)), 1.0)
    tq = EDGE_REL * max(float(np.quantile(gq[inner], 0.95)), 1.0)
    be, bq = (ge >= te) & inner, (gq >= tq) & inner
    n_e = int(be.sum())
    found = be & _dilate(bq)
    recall = 1.0 if n_e < MIN_EDGES else float(found.sum()) / n_e
    n = be.shape[0]
    cuts = np.linspace(0, n, EDGE_BLOCKS + 1).round().astype(int)
    tot = good = 0
    for y0, y1 in zip(cuts[:-1], cuts[1:]):
        for x0, x1 in zip(cuts[:-1], cuts[1:]):
            k = int(be[y0:y1, x0:x1].sum())
            if k >= BLOCK_MIN_EDGES:
                tot += 1
                good += int(found[y0:y1, x0:x1].sum()) >= BLOCK_RECALL * k
    n_q = int(bq.sum())
    prec = 1.0 if n_q < MIN_EDGES else float((bq & _dilate(be)).sum()) / n_q
    return ColourScore(hue, round(recall, 4), grey, edge_precision=round(prec, 4),
                       edge_blocks=round(good / tot, 4) if tot else 1.0)
