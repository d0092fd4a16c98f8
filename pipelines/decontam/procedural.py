"""Procedural training images for the copy descriptor: unlimited, free of any licence, reproducible from a seed.

Four recipes with natural-image-like statistics (occlusion, edges at many scales, smooth shading, textures):
``leaves`` (a dead-leaves model: many occluding shapes with power-law sizes), ``object`` (one to three composite
objects on a smooth two-tone background, the way small photo datasets frame a subject), ``noise`` (coloured
1/f^a noise, sometimes thresholded into blobs) and ``pattern`` (stripes, grids, rings, glyphs, warped).

Images come in *families*: :func:`canvas` takes a ``style`` seed (recipe, palette, background, density) and a
``layout`` seed (where things are). Two canvases with one style and different layouts are look-alikes, not copies;
training puts both in a batch as different identities, so the descriptor learns to tell a copy from a same-kind
picture (the same-class distractors a contamination audit meets). numpy + Pillow only.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy.ndimage import gaussian_filter

RECIPES = ("leaves", "object", "noise", "pattern")
SUPER = 2  # shapes are drawn at 2x and reduced (anti-aliased edges)


def _colour(rng: np.random.Generator, palette: np.ndarray) -> tuple[int, int, int]:
    base = palette[int(rng.integers(len(palette)))]
    return tuple(int(v) for v in np.clip(base + rng.normal(0, 14, 3), 0, 255))


def _palette(rng: np.random.Generator) -> np.ndarray:
    """3..7 colours; sometimes muted (natural scenes), sometimes saturated (graphics)."""
    k = int(rng.integers(3, 8))
    cols = rng.integers(0, 256, (k, 3)).astype(np.float32)
    if rng.random() < 0.6:  # muted: pull towards a common grey
        grey = cols.mean(axis=1, keepdims=True)
        cols = grey + (cols - grey) * rng.uniform(0.2, 0.7)
    return cols


def smooth_field(rng: np.random.Generator, size: int, palette: np.ndarray, cells: int | None = None) -> np.ndarray:
    """A smooth colour field: a few random colours on a coarse grid, bicubic-upsampled, plus a gradient."""
    n = cells or int(rng.integers(2, 5))
    low = np.stack([palette[int(rng.integers(len(palette)))] + rng.normal(0, 20, 3) for _ in range(n * n)])
    low = np.clip(low.reshape(n, n, 3), 0, 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(low, "RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    a = rng.uniform(0, 2 * math.pi)
    field += rng.uniform(0, 40) * (xx * math.cos(a) + yy * math.sin(a))[..., None]
    return field


def _texture(rng: np.random.Generator, size: int, rgb, palette: np.ndarray) -> np.ndarray:
    """A full-canvas fill for one shape: flat, gradient, stripes, dots or noise around the shape's colour."""
    base = np.empty((size, size, 3), np.float32)
    base[:] = rgb
    kind = rng.choice(["flat", "flat", "gradient", "stripes", "dots", "noise"])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        base += (rng.uniform(-60, 60) * ((xx * math.cos(a) + yy * math.sin(a)) / size))[..., None]
    elif kind == "stripes":
        period = rng.uniform(3, 12) * SUPER
        a = rng.uniform(0, math.pi)
        sel = np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0
        base[sel] = _colour(rng, palette)
    elif kind == "dots":
        period = int(rng.integers(4, 10)) * SUPER
        sel = ((yy % period) - period / 2) ** 2 + ((xx % period) - period / 2) ** 2 < (period * 0.3) ** 2
        base[sel] = _colour(rng, palette)
    elif kind == "noise":
        low = rng.normal(0, 35, (max(2, size // 8), max(2, size // 8), 1)).astype(np.float32)
        up = np.asarray(Image.fromarray(low[..., 0]).resize((size, size), Image.Resampling.BICUBIC), np.float32)
        base += up[..., None]
    return np.clip(base, 0, 255)


def _shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, r: float) -> None:
    kind = rng.choice(["ellipse", "rect", "poly", "blob", "triangle"])
    if kind == "ellipse":
        ax, ay = r * rng.uniform(0.4, 1.0), r * rng.uniform(0.4, 1.0)
        draw.ellipse((cx - ax, cy - ay, cx + ax, cy + ay), fill=255)
        return
    if kind == "rect":
        n, ang = 4, rng.uniform(0, math.pi)
        radii = [r * rng.uniform(0.5, 1.0)] * 4
        angles = [ang + k * math.pi / 2 + rng.uniform(-0.3, 0.3) for k in range(4)]
    elif kind == "triangle":
        n, ang = 3, rng.uniform(0, 2 * math.pi)
        radii = [r * rng.uniform(0.6, 1.0) for _ in range(3)]
        angles = [ang + k * 2 * math.pi / 3 + rng.uniform(-0.3, 0.3) for k in range(3)]
    else:
        n = int(rng.integers(5, 11))
        radii = [r * rng.uniform(0.45 if kind == "blob" else 0.3, 1.0) for _ in range(n)]
        angles = sorted(rng.uniform(0, 2 * math.pi, n))
    draw.polygon([(cx + rr * math.cos(a), cy + rr * math.sin(a)) for rr, a in zip(radii, angles)], fill=255)


def _paint(img: Image.Image, rng: np.random.Generator, palette: np.ndarray, cx, cy, r) -> None:
    S = img.size[0]
    mask = Image.new("L", (S, S), 0)
    _shape(ImageDraw.Draw(mask), rng, cx, cy, r)
    fill = _texture(rng, S, _colour(rng, palette), palette)
    img.paste(Image.fromarray(fill.astype(np.uint8), "RGB"), (0, 0), mask)


def _leaves(style: np.random.Generator, rng: np.random.Generator, size: int) -> Image.Image:
    palette = _palette(style)
    n = int(style.integers(12, 90))
    rmin, rmax = size * SUPER * style.uniform(0.02, 0.06), size * SUPER * style.uniform(0.3, 0.7)
    S = size * SUPER
    img = Image.fromarray(smooth_field(rng, S, palette).clip(0, 255).astype(np.uint8), "RGB")
    for _ in range(n):  # sizes ~ r^-3 (dead leaves): many small, few large
        u = rng.random()
        r = 1.0 / math.sqrt(u / rmin**2 + (1 - u) / rmax**2)
        _paint(img, rng, palette, rng.uniform(-0.1, 1.1) * S, rng.uniform(-0.1, 1.1) * S, r)
    return img


def _object(style: np.random.Generator, rng: np.random.Generator, size: int) -> Image.Image:
    palette = _palette(style)
    S = size * SUPER
    bg = smooth_field(rng, S, palette, cells=int(style.integers(2, 4)))
    if style.random() < 0.6:  # a horizon: sky / ground of two tones
        horizon = rng.uniform(0.35, 0.8) * S + np.tan(rng.uniform(-0.3, 0.3)) * (np.arange(S) - S / 2)
        ground = np.asarray(_colour(style, palette), np.float32)
        rows = np.arange(S)[:, None]
        bg = np.where((rows > horizon[None, :])[..., None], 0.5 * bg + 0.5 * ground, bg)
    bg += rng.normal(0, style.uniform(1, 6), bg.shape)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    obj_palette = _palette(style)
    for _ in range(int(style.integers(1, 4))):
        cx, cy = rng.uniform(0.25, 0.75) * S, rng.uniform(0.25, 0.75) * S
        big = S * rng.uniform(0.12, 0.3)
        for _ in range(int(rng.integers(2, 6))):  # a composite object: parts around a centre
            _paint(img, rng, obj_palette, cx + rng.normal(0, big * 0.5), cy + rng.normal(0, big * 0.5),
                   big * rng.uniform(0.3, 0.9))
    if rng.random() < 0.5:  # thin details (branches, legs, wires)
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = rng.uniform(0, S, 2)
            a, ln = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.5) * S
            d.line((x0, y0, x0 + ln * math.cos(a), y0 + ln * math.sin(a)), fill=_colour(rng, obj_palette),
                   width=int(rng.integers(1, 4)) * SUPER)
    return img


def _noise(style: np.random.Generator, rng: np.random.Generator, size: int) -> Image.Image:
    S = size * SUPER
    alpha = style.uniform(1.0, 2.6)
    fy, fx = np.fft.fftfreq(S)[:, None], np.fft.rfftfreq(S)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / S) ** alpha
    chans = []
    for _ in range(3):
        spec = amp * (rng.normal(size=amp.shape) + 1j * rng.normal(size=amp.shape))
        f = np.fft.irfft2(spec, s=(S, S))
        chans.append((f - f.mean()) / (f.std() + 1e-9))
    x = np.stack(chans, -1)
    mix = style.normal(0, 1, (3, 3)) + np.eye(3) * style.uniform(0, 2)
    x = x @ mix
    if style.random() < 0.35:  # blobs: threshold one channel into two colours
        palette = _palette(style)
        sel = x[..., 0] > np.quantile(x[..., 0], style.uniform(0.3, 0.7))
        out = np.where(sel[..., None], palette[0], palette[1]) + 20 * x[..., 1:2]
    else:
        out = 128 + x / (np.abs(x).max() + 1e-9) * style.uniform(60, 127)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _pattern(style: np.random.Generator, rng: np.random.Generator, size: int) -> Image.Image:
    palette = _palette(style)
    S = size * SUPER
    img = Image.fromarray(smooth_field(rng, S, palette).clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    kind = style.choice(["lines", "grid", "rings", "glyphs"])
    n = int(rng.integers(4, 14))
    if kind == "lines":
        for _ in range(n):
            x0, y0, x1, y1 = rng.uniform(-0.2, 1.2, 4) * S
            d.line((x0, y0, x1, y1), fill=_colour(rng, palette), width=int(rng.integers(1, 6)) * SUPER)
    elif kind == "grid":
        step = rng.uniform(0.08, 0.25) * S
        off = rng.uniform(0, step, 2)
        w = int(rng.integers(1, 4)) * SUPER
        for k in range(int(S / step) + 2):
            d.line((off[0] + k * step, 0, off[0] + k * step, S), fill=_colour(rng, palette), width=w)
            d.line((0, off[1] + k * step, S, off[1] + k * step), fill=_colour(rng, palette), width=w)
    elif kind == "rings":
        cx, cy = rng.uniform(0, S, 2)
        for k in range(n, 0, -1):
            rr = k * S / n * rng.uniform(0.6, 1.0)
            d.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=_colour(rng, palette))
    else:
        font = ImageFont.load_default(size=int(S * rng.uniform(0.12, 0.3)))
        for _ in range(n // 2 + 1):
            text = "".join(rng.choice(list("ABCDEFGHKLMNPRSTWXYZabdeghkmnpqrstwxyz0123456789"), int(rng.integers(1, 5))))
            d.text(tuple(rng.uniform(-0.1, 0.8, 2) * S), text, fill=_colour(rng, palette), font=font)
    for _ in range(int(rng.integers(0, 4))):
        _paint(img, rng, palette, rng.uniform(0, S), rng.uniform(0, S), S * rng.uniform(0.05, 0.25))
    return img


_RECIPE_FN = {"leaves": _leaves, "object": _object, "noise": _noise, "pattern": _pattern}
RECIPE_WEIGHTS = (0.35, 0.35, 0.15, 0.15)


def canvas(style_seed: int, layout_seed: int, size: int = 48, *, texture: float = 0.0,
           weights: tuple[float, ...] = RECIPE_WEIGHTS) -> np.ndarray:
    """(size, size, 3) uint8 RGB image; equal ``style_seed`` = same kind of picture, other ``layout_seed`` = a
    look-alike, equal both = the same picture. ``texture``: probability of a fine grain (per style)."""
    style = np.random.default_rng([style_seed, 0x5EED])
    rng = np.random.default_rng([style_seed, layout_seed, 0x1A])
    recipe = RECIPES[int(style.choice(len(RECIPES), p=np.asarray(weights, dtype=float)))]
    img = _RECIPE_FN[recipe](style, rng, size)
    if style.random() < 0.3:  # depth of field / soft photos
        img = img.filter(ImageFilter.GaussianBlur(float(style.uniform(0.5, 1.5)) * SUPER))
    out = np.asarray(img.reduce(SUPER), dtype=np.float32)
    if texture and style.random() < texture:  # fine texture (grain, foliage, fabric): detail of this very picture
        grain = gaussian_filter(rng.normal(0, 1, (size, size)), float(style.uniform(0.4, 1.2)), mode="wrap")
        out += (grain / (grain.std() + 1e-6) * style.uniform(3, 16))[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def canvases(n_styles: int, per_style: int = 2, size: int = 48, seed: int = 0, **kw) -> np.ndarray:
    """(n_styles * per_style, size, size, 3) uint8: ``per_style`` look-alike layouts of each style, adjacent."""
    out = np.empty((n_styles * per_style, size, size, 3), np.uint8)
    for s in range(n_styles):
        for k in range(per_style):
            out[s * per_style + k] = canvas(seed * 1_000_003 + s, k, size, **kw)
    return out
