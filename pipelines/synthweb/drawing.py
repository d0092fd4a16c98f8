"""Procedural drawing of synthetic-web scenes: 1-3 coloured, textured shapes on a light background (PIL).

Two styles: :func:`render` draws web pictures (shapes at the named position their caption states, on a flat noisy
tint, or with ``room=True`` on a shaded room of the picture's own); :func:`render_heldout` draws the evaluation
split (free placement, small rotations, a shaded background), so evaluation pictures of a concept are the same
concept to a model but not look-alikes of its web pictures.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

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


def render(scene: Scene, rng: np.random.Generator, room: bool = False) -> Image.Image:
    """Draw ``scene`` with randomness (background, jitter, placement) from ``rng``.

    The flat tint makes the pictures of one concept and position look alike to a perceptual hash (of 1,500
    pictures, 24.5 % fall within a pHash radius of 4 of an earlier one, more as the web grows); ``room=True`` puts each
    picture on a :func:`_shaded_background` of its own, so distinct pictures stay distinct to pHash, as photos of
    the real web do."""
    W, H = scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE
    if room:
        luma = 0.299 * scene.rgb[0] + 0.587 * scene.rgb[1] + 0.114 * scene.rgb[2]
        bg = _shaded_background(rng, scene.width, scene.height, 70.0 if luma > 160 else 0.0)
        canvas = Image.fromarray(bg, "RGB").resize((W, H), Image.BILINEAR)
    else:
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


def _shaded_background(rng: np.random.Generator, width: int, height: int, dim: float = 0.0) -> np.ndarray:
    """A neutral "room" behind the objects: a wall and a floor of two grey tones split by a tilted horizon, shaded
    by a gradient in a random direction and a few soft blobs.

    Structure of its own (the horizon's edge, the shading) gives every evaluation picture an identity that other
    pictures of its concept do not share, as the backgrounds of real photos do; a near-duplicate detector can tell
    a copy from a look-alike by it. Tones stay unsaturated, so the object's colour still stands out; ``dim`` darkens
    the room for a light object (yellow), which would otherwise hardly differ from the wall in brightness."""
    wall = float(rng.uniform(205, 245)) - dim
    floor = wall - float(rng.uniform(55, 95)) * (1 if rng.random() < 0.75 else -0.4)
    corner_wall = wall - float(rng.uniform(20, 40))  # the other wall, where a room corner shows
    tint = rng.uniform(-6, 6, size=3).astype(np.float32)  # a faint colour cast, far from any object's saturation
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx, yy = xx / max(width - 1, 1) - 0.5, yy / max(height - 1, 1) - 0.5
    horizon = rng.uniform(-0.2, 0.2) + np.tan(np.radians(rng.uniform(-15, 15))) * xx
    corner = rng.uniform(-0.3, 0.3) if rng.random() < 0.6 else 1.0  # 1.0: no corner in view
    side = xx > corner if rng.random() < 0.5 else xx < corner
    grey = np.where(yy > horizon, floor, np.where(side, corner_wall, wall)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    grey += rng.uniform(15, 30) * (xx * math.cos(angle) + yy * math.sin(angle))
    for _ in range(int(rng.integers(2, 5))):
        bx, by = rng.uniform(-0.5, 0.5, size=2)
        sigma = rng.uniform(0.1, 0.25)
        grey += rng.uniform(-20, 20) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * sigma**2))
    noise = rng.normal(0, 4, size=(height, width, 1))
    return np.clip(grey[:, :, None] + tint[None, None, :] + noise, 40, 255).astype(np.uint8)


_NAMED_POSITIONS = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3),
                    "bottom": (0.5, 0.7)}


def _free_centres(rng: np.random.Generator, scene: Scene, W: int, H: int) -> list[tuple[float, float, float]]:
    """(cx, cy, r) per object: a single object lands loosely around its named position (up to 15% of the canvas
    off, where the web's pictures are within 3%), several objects anywhere, kept apart."""
    short = min(W, H)
    out: list[tuple[float, float, float]] = []
    for _ in range(scene.count):
        r = short * (rng.uniform(0.2, 0.33) if scene.count == 1 else rng.uniform(0.11, 0.16))
        margin = r * 1.15  # stars and triangles reach 1.1 r from their centre
        for _attempt in range(50):
            if scene.count == 1:
                fx, fy = _NAMED_POSITIONS[scene.position]
                cx, cy = W * (fx + rng.uniform(-0.15, 0.15)), H * (fy + rng.uniform(-0.15, 0.15))
            else:
                cx, cy = rng.uniform(margin, W - margin), rng.uniform(margin, H - margin)
            cx, cy = float(np.clip(cx, margin, W - margin)), float(np.clip(cy, margin, H - margin))
            if all(math.hypot(cx - ox, cy - oy) > (r + orr) * 1.15 for ox, oy, orr in out):
                break
        out.append((cx, cy, r))
    return out


def render_heldout(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` in the evaluation style: objects placed freely (:func:`_free_centres`), each turned
    by up to 20 degrees (small enough that a square never reads as a diamond), on :func:`_shaded_background`."""
    W, H = scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE
    luma = 0.299 * scene.rgb[0] + 0.587 * scene.rgb[1] + 0.114 * scene.rgb[2]  # ITU-R 601, as PIL's "L"
    dim = 70.0 if luma > 160 else 0.0
    canvas = Image.fromarray(_shaded_background(rng, scene.width, scene.height, dim), "RGB").resize((W, H),
                                                                                                  Image.BILINEAR)
    jitter = rng.integers(-18, 19, size=3)
    rgb = np.clip(np.array(scene.rgb) + jitter, 0, 255)
    mask_img = Image.new("L", (W, H), 0)
    for cx, cy, r in _free_centres(rng, scene, W, H):
        # Drawn and turned on a tile around the object only (a whole-canvas rotation costs 4x the drawing).
        half = int(math.ceil(r * 1.6))
        tile = Image.new("L", (2 * half, 2 * half), 0)
        draw_shape_mask(ImageDraw.Draw(tile), scene.kind, half + (cx % 1), half + (cy % 1), r)
        tile = tile.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
        box = (int(cx) - half, int(cy) - half, int(cx) + half, int(cy) + half)
        mask_img.paste(ImageChops.lighter(mask_img.crop(box), tile), box)
    period = max(3, int(min(scene.width, scene.height) * rng.uniform(0.06, 0.09)))
    layer = _texture_layer((scene.width, scene.height), rgb, scene.texture, period).resize((W, H), Image.NEAREST)
    canvas.paste(layer, (0, 0), mask_img)
    return canvas.reduce(SUPERSAMPLE)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
