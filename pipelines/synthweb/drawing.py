"""Procedural drawing of synthetic-web scenes: 1-3 coloured, textured shapes on a light noisy background (PIL)."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 3  # shapes are drawn larger and downsampled so edges are anti-aliased


@dataclass(frozen=True)
class Scene:
    kind: str
    rgb: tuple[int, int, int]
    count: int
    texture: str
    position: str
    width: int
    height: int


def _regular_polygon(cx, cy, r, n, rotation=-math.pi / 2):
    return [(cx + r * math.cos(rotation + 2 * math.pi * i / n), cy + r * math.sin(rotation + 2 * math.pi * i / n))
            for i in range(n)]


def _star(cx, cy, r, points=5):
    out = []
    for i in range(2 * points):
        rad = r if i % 2 == 0 else r * 0.42
        a = -math.pi / 2 + math.pi * i / points
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def _heart(cx, cy, r, steps=60):
    # The classic parametric heart curve, scaled so its bounding box is about 2r wide.
    pts = []
    for i in range(steps):
        t = 2 * math.pi * i / steps
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x * r / 17, cy - y * r / 17 - r * 0.1))
    return pts


def _arrow(cx, cy, r):
    w = r * 0.38
    return [(cx - r, cy - w), (cx + r * 0.15, cy - w), (cx + r * 0.15, cy - r * 0.85), (cx + r, cy),
            (cx + r * 0.15, cy + r * 0.85), (cx + r * 0.15, cy + w), (cx - r, cy + w)]


def draw_shape_mask(mask: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float) -> None:
    """Paint one shape of ``kind`` (255 = inside) centred at (cx, cy) with half-size r."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        mask.ellipse(box, fill=255)
    elif kind == "square":
        s = r * 0.85
        mask.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif kind == "triangle":
        mask.polygon(_regular_polygon(cx, cy + r * 0.15, r * 1.1, 3), fill=255)
    elif kind == "star":
        mask.polygon(_star(cx, cy, r * 1.1), fill=255)
    elif kind == "heart":
        mask.polygon(_heart(cx, cy, r), fill=255)
    elif kind == "cross":
        t = r * 0.32
        mask.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
        mask.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
    elif kind == "diamond":
        mask.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=255)
    elif kind == "ring":
        mask.ellipse(box, fill=255)
        q = r * 0.55
        mask.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif kind == "hexagon":
        mask.polygon(_regular_polygon(cx, cy, r, 6, rotation=0), fill=255)
    elif kind == "crescent":
        mask.ellipse(box, fill=255)
        mask.ellipse((cx - r * 0.45, cy - r * 1.0, cx + r * 1.45, cy + r * 0.9), fill=0)
    elif kind == "arrow":
        mask.polygon(_arrow(cx, cy, r), fill=255)
    elif kind == "pentagon":
        mask.polygon(_regular_polygon(cx, cy, r, 5), fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _texture_layer(size: tuple[int, int], rgb: np.ndarray, texture: str, period: int) -> Image.Image:
    """A full-canvas fill in the object's colour; patterns use a lighter tint so the hue stays dominant."""
    w, h = size
    base = np.empty((h, w, 3), np.float32)
    base[:] = rgb
    light = rgb + (255 - rgb) * 0.4
    yy, xx = np.mgrid[0:h, 0:w]
    if texture == "striped":
        sel = ((xx + yy) // period) % 2 == 1
    elif texture == "dotted":
        cyc, cxc = (yy % period) - period / 2, (xx % period) - period / 2
        sel = cyc**2 + cxc**2 < (period * 0.28) ** 2
    elif texture == "checkered":
        sel = ((xx // period) + (yy // period)) % 2 == 1
    else:
        sel = None
    if sel is not None:
        base[sel] = light
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")


def _centres(rng: np.random.Generator, scene: Scene, W: int, H: int) -> list[tuple[float, float, float]]:
    """(cx, cy, r) per object at supersampled scale: a single object sits at its named position, several
    objects take distinct cells of a 3x3 grid."""
    short = min(W, H)
    if scene.count == 1:
        r = short * rng.uniform(0.24, 0.34)
        fx, fy = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3),
                  "bottom": (0.5, 0.7)}[scene.position]
        jitter = short * 0.03
        return [(W * fx + rng.uniform(-jitter, jitter), H * fy + rng.uniform(-jitter, jitter), r)]
    cells = rng.permutation(9)[: scene.count]
    out = []
    for c in cells:
        gx, gy = int(c) % 3, int(c) // 3
        r = short * rng.uniform(0.12, 0.15)
        out.append((W * (gx + 0.5) / 3 + rng.uniform(-1, 1) * short * 0.02,
                    H * (gy + 0.5) / 3 + rng.uniform(-1, 1) * short * 0.02, r))
    return out


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` with randomness (background, jitter, placement) from ``rng``."""
    W, H = scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE
    bg_rgb = rng.integers(205, 250, size=3)
    # Background: a light tint with mild per-pixel noise (drawn at final size, then upscaled: cheap).
    noise = rng.normal(0, 6, size=(scene.height, scene.width, 1))
    bg = np.clip(bg_rgb[None, None, :] + noise, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(bg, "RGB").resize((W, H), Image.NEAREST)
    jitter = rng.integers(-18, 19, size=3)
    rgb = np.clip(np.array(scene.rgb) + jitter, 0, 255)
    mask_img = Image.new("L", (W, H), 0)
    mask = ImageDraw.Draw(mask_img)
    for cx, cy, r in _centres(rng, scene, W, H):
        draw_shape_mask(mask, scene.kind, cx, cy, r)
    # The texture is computed at final size and upscaled (its edges need no anti-aliasing); only the shape
    # outline is drawn supersampled, then box-reduced.
    period = max(3, int(min(scene.width, scene.height) * rng.uniform(0.06, 0.09)))
    layer = _texture_layer((scene.width, scene.height), rgb, scene.texture, period).resize((W, H), Image.NEAREST)
    canvas.paste(layer, (0, 0), mask_img)
    return canvas.reduce(SUPERSAMPLE)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
