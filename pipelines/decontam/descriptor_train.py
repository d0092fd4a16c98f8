"""Train the copy descriptor (:mod:`descriptor`) self-supervised on procedural images, reproducibly, on a CPU.

    python -m pipelines.decontam.descriptor_train train --out pipelines/decontam/copy_descriptor.npz
    python -m pipelines.decontam.descriptor_train calibrate --weights pipelines/decontam/copy_descriptor.npz

``train``: :func:`procedural.canvases` draws ``n_styles`` x 2 look-alike canvases (48 px); every step takes
``batch`` canvases (both layouts of ``batch / 2`` styles, so every batch holds same-kind look-alikes as negatives)
and makes two random *views* of each (:func:`view`): a window of the canvas at a random place
(``window`` v1, the shipped weights: a square 62-100 % window, half of them 78-92 %, i.e. shifts of a few pixels,
with a slight aspect change; v2: half a square 82-94 % window, half each side 72-100 % independently), rotation,
colour
jitter (brightness, contrast, saturation, hue, channel gains, gamma), greyscale, blur, down/up-scaling, noise,
banners, padding, JPEG at quality 15-90; then greyscale 32 x 32. The loss is InfoNCE over the 2 x batch views (each
view must pick its sibling) plus a small KoLeo term (spreads the vectors, so one cosine threshold fits all
kinds of pictures; Pizzi et al. 2022, SSCD). Fixed steps, seeds and thread count: the same command writes the
same weights. BatchNorm is folded into the convolutions on export.

``calibrate``: sets the thresholds stored with the weights from the calibration suite of :mod:`calibrate`:
procedural canvases of styles training never used, planted copies of every transform family of :mod:`augment`
and same-style look-alikes. Nothing here sees CIFAR or any evaluation set it is reported on.

torch is needed here only (training); inference is numpy (:mod:`descriptor`).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipelines.decontam import procedural
from pipelines.decontam.descriptor import ARCH, FORMAT, SIDE, CopyDescriptor, weights_fingerprint


@dataclass(frozen=True)
class TrainRecipe:
    n_styles: int = 10_000  # procedural styles, 2 look-alike layouts each
    canvas: int = 48
    steps: int = 1200
    batch: int = 256  # canvases per step (2 views each)
    lr: float = 2e-3
    weight_decay: float = 5e-4
    temperature: float = 0.07
    koleo: float = 0.05
    dim: int = 128
    seed: int = 0
    threads: int = 2  # fixed: float sums (and so the weights) depend on it
    window: str = "v1"  # view windows: v1 = square 62-100 % (half 78-92 %), slight aspect change; v2 = below
    texture: float = 0.0  # probability of a fine grain on a canvas style (procedural.canvas)
    n_val_styles: int = 500  # held-out styles for the validation figures stored with the weights


# ------------------------------------------------------------------------------------------------- views


def _window(c: np.ndarray, rng: np.random.Generator, kind: str = "v1") -> Image.Image:
    S = c.shape[0]
    img = Image.fromarray(c, "RGB")
    if rng.random() < 0.1:
        img = img.rotate(float(rng.uniform(-6, 6)), resample=Image.Resampling.BICUBIC)
        lo_f = 0.75  # stay inside the rotated canvas's content
    else:
        lo_f = 0.62
    if kind == "v1":
        f = rng.uniform(0.78, 0.92) if rng.random() < 0.5 else rng.uniform(lo_f, 1.0)
        a = math.exp(rng.uniform(-0.12, 0.12))
        w, h = min(S, f * S * math.sqrt(a)), min(S, f * S / math.sqrt(a))
    elif rng.random() < 0.5:  # v2: a window shifted by a few pixels, the commonest copy
        w = h = S * rng.uniform(0.82, 0.94)
    else:  # v2: re-cropped, each side 72-100 % of the canvas independently (the aspect changes)
        w, h = S * rng.uniform(lo_f + 0.1, 1.0), S * rng.uniform(lo_f + 0.1, 1.0)
    x0, y0 = rng.uniform(0, S - w), rng.uniform(0, S - h)
    return img.resize((SIDE, SIDE), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w, y0 + h))


def _colour(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x: (32, 32, 3) float in 0..255."""
    if rng.random() < 0.4:  # hue rotation (through PIL's HSV)
        hsv = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB").convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-26, 27))) % 256
        x = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32)
    if rng.random() < 0.5:
        x = x * rng.uniform(0.85, 1.15, 3)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    sat = 0.0 if rng.random() < 0.15 else rng.uniform(0.3, 1.6)
    x = grey[..., None] + (x - grey[..., None]) * sat
    x = x * rng.uniform(0.75, 1.25)
    m = x.mean()
    x = (x - m) * rng.uniform(0.6, 1.4) + m + rng.uniform(-20, 20)
    if rng.random() < 0.5:
        x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    return np.clip(x, 0, 255)


def _banner(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    h = int(rng.integers(3, 7))
    top = rng.random() < 0.5
    fill = tuple(int(v) for v in rng.choice([[255, 255, 255], [0, 0, 0], rng.integers(0, 256, 3)]))
    d = ImageDraw.Draw(img)
    y0 = 0 if top else SIDE - h
    d.rectangle((0, y0, SIDE, y0 + h - 1), fill=fill)
    ink = (0, 0, 0) if sum(fill) > 384 else (255, 255, 255)
    for _ in range(int(rng.integers(3, 12))):
        x = int(rng.integers(1, SIDE - 2))
        d.line((x, y0 + 1, x + int(rng.integers(0, 3)), y0 + h - 2), fill=ink)
    return img


def _pad(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    k = rng.uniform(0.7, 0.95)
    w, h = (max(8, round(SIDE * k)), SIDE) if rng.random() < 0.3 else \
        ((SIDE, max(8, round(SIDE * k))) if rng.random() < 0.4 else (max(8, round(SIDE * k)),) * 2)
    small = img.resize((w, h), Image.Resampling.BILINEAR)
    fill = tuple(int(v) for v in rng.choice([[0, 0, 0], [255, 255, 255], rng.integers(0, 256, 3)]))
    out = Image.new("RGB", (SIDE, SIDE), fill)
    out.paste(small, (int(rng.integers(0, SIDE - w + 1)), int(rng.integers(0, SIDE - h + 1))))
    return out


def view(c: np.ndarray, rng: np.random.Generator, window: str = "v1") -> np.ndarray:
    """One random copy of an (S, S, 3) uint8 canvas -> (32, 32) uint8 grey network input."""
    img = _window(c, rng, window)
    img = Image.fromarray(_colour(np.asarray(img, np.float32), rng).astype(np.uint8), "RGB")
    if rng.random() < 0.08:
        img = _banner(img, rng)
    if rng.random() < 0.12:
        img = _pad(img, rng)
    r = rng.random()
    if r < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    elif r < 0.35:
        s = int(rng.integers(14, 25))
        img = img.resize((s, s), Image.Resampling.BILINEAR).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(1, 6), (SIDE, SIDE, 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.35:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(15, 91)))
        img = Image.open(io.BytesIO(buf.getvalue()))
    return np.asarray(img.convert("L"), np.uint8)


# ------------------------------------------------------------------------------------------------- model


def make_net(dim: int):
    """The torch twin of :meth:`descriptor.CopyDescriptor.forward` (with BatchNorm, folded on export)."""
    import torch.nn as nn  # noqa: PLC0415

    layers = []
    for _, cin, cout, stride in ARCH:
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    last = ARCH[-1][2]
    return nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(last * 16, dim))


def standardise_torch(u8):
    """Same as :func:`descriptor.standardise`, NCHW."""
    x = u8.float().unsqueeze(1) / 255.0
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    s = x.std(dim=(1, 2, 3), keepdim=True, correction=0)
    return (x - m) / (s + 0.05)


def export(net) -> dict[str, np.ndarray]:
    """Fold each BatchNorm (eval statistics) into the convolution before it; numpy float32 arrays."""
    mods = list(net)
    out, k = {}, 0
    for name, *_ in ARCH:
        conv, bn = mods[k], mods[k + 1]
        scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
        out[f"{name}.w"] = (conv.weight.detach() * scale[:, None, None, None]).numpy().astype(np.float32)
        out[f"{name}.b"] = (bn.bias.detach() - bn.running_mean * scale).numpy().astype(np.float32)
        k += 3
    fc = mods[-1]
    out["fc.w"] = fc.weight.detach().numpy().astype(np.float32).copy()
    out["fc.b"] = fc.bias.detach().numpy().astype(np.float32).copy()
    return out


def _views(canv: np.ndarray, idx: np.ndarray, rng: np.random.Generator, window: str = "v1") -> np.ndarray:
    return np.stack([view(canv[i], rng, window) for i in idx])


def _val_report(desc: CopyDescriptor, val: np.ndarray, rng: np.random.Generator) -> dict:
    """Positive pairs (two views of a canvas) vs look-alikes (a view of its sibling layout) and all others."""
    n = len(val)
    a = desc.embed_u8(_views(val, np.arange(n), rng))
    b = desc.embed_u8(_views(val, np.arange(n), rng))
    pos = np.sum(a * b, axis=1)
    sib = np.arange(n) ^ 1  # layouts 0/1 of a style are adjacent
    look = np.sum(a * b[sib], axis=1)
    sims = a @ b.T
    np.fill_diagonal(sims, -1)
    hardest = sims.max(axis=1)
    top1 = float(np.mean(np.argmax(a @ b.T, axis=1) == np.arange(n)))
    q = lambda x, p: round(float(np.quantile(x, p)), 4)  # noqa: E731
    return {"top1": round(top1, 4), "pos_p01": q(pos, 0.01), "pos_p05": q(pos, 0.05), "pos_med": q(pos, 0.5),
            "lookalike_p99": q(look, 0.99), "lookalike_med": q(look, 0.5), "hardest_neg_p99": q(hardest, 0.99)}


def train(recipe: TrainRecipe, log=print) -> CopyDescriptor:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.perf_counter()
    canv = procedural.canvases(recipe.n_styles, 2, recipe.canvas, seed=recipe.seed, texture=recipe.texture)
    val = procedural.canvases(recipe.n_val_styles, 2, recipe.canvas, seed=recipe.seed + 7919, texture=recipe.texture)
    log(f"{len(canv)} training canvases + {len(val)} validation canvases in {time.perf_counter() - t0:.0f} s")
    net = make_net(recipe.dim)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    warm = max(1, recipe.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / recipe.steps))))
    half = recipe.batch // 2
    target = torch.cat([torch.arange(recipe.batch, 2 * recipe.batch), torch.arange(0, recipe.batch)])
    net.train()
    for step in range(recipe.steps):
        styles = rng.choice(recipe.n_styles, half, replace=False)
        idx = np.stack([2 * styles, 2 * styles + 1], 1).reshape(-1)
        v = np.concatenate([_views(canv, idx, rng, recipe.window), _views(canv, idx, rng, recipe.window)])
        z = F.normalize(net(standardise_torch(torch.from_numpy(v))), dim=1)
        logits = z @ z.T / recipe.temperature
        logits.fill_diagonal_(float("-inf"))
        loss = F.cross_entropy(logits, target)
        if recipe.koleo:
            zz = z[: recipe.batch]
            d = torch.cdist(zz, zz) + torch.eye(len(zz)) * 1e3
            loss = loss - recipe.koleo * torch.log(d.min(dim=1).values + 1e-8).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    net.eval()
    weights = export(net)
    meta = {"format": FORMAT, "arch": [list(a) for a in ARCH], "dim": recipe.dim, "side": SIDE,
            "recipe": asdict(recipe), "fingerprint": weights_fingerprint(weights),
            "train_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
            "command": "python -m pipelines.decontam.descriptor_train train " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in asdict(recipe).items()),
            "thresholds": {}}
    desc = CopyDescriptor(weights, meta)
    desc.meta["validation"] = _val_report(desc, val, np.random.default_rng(recipe.seed + 1))
    log(f"validation (procedural, held-out styles): {desc.meta['validation']}")
    return desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.decontam.descriptor_train")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the descriptor on procedural images")
    tr.add_argument("--out", required=True)
    for k, v in asdict(TrainRecipe()).items():
        tr.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ca = sub.add_parser("calibrate", help="set the thresholds from the procedural calibration suite (calibrate.py)")
    ca.add_argument("--weights", required=True)
    ca.add_argument("--out", help="write here instead of over --weights")
    ca.add_argument("--per-family", type=int, default=80)
    ca.add_argument("--n-eval", type=int, default=2000)
    ca.add_argument("--distractors", type=int, default=1600)
    ca.add_argument("--seed", type=int, default=0)
    ca.add_argument("--dump", help="write every scored candidate pair here (JSON) for analysis")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        recipe = TrainRecipe(**{k: getattr(a, k) for k in asdict(TrainRecipe())})
        desc = train(recipe)
        desc.save(a.out)
        print(f"wrote {a.out} (fingerprint {desc.fingerprint[:16]}; run calibrate next)")
        return 0
    from pipelines.decontam.calibrate import calibrate  # noqa: PLC0415

    desc = CopyDescriptor.load(a.weights, require_thresholds=False)
    report = calibrate(desc, per_family=a.per_family, seed=a.seed, n_eval=a.n_eval, n_distractors=a.distractors,
                       dump=a.dump)
    desc.meta["thresholds"] = report["thresholds"]
    desc.meta["calibration"] = report
    desc.save(a.out or a.weights)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
