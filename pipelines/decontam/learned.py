"""Learned near-duplicate check (CLIP appendix C): a small conv net trained with InfoNCE on synthetic copies of the
evaluation images, whose cosine similarity verifies hash candidates.

Hashes and the hand-made correlation check confuse same-distribution look-alikes (two white cars, two planes on a
blue sky) with edited copies. A net trained to map an image and its synthetic copies (crops, zooms, aspect
distortion, down/up-scaling, small rotations, JPEG, brightness/contrast/gamma jitter, mirror, pads, banners) close
together and *other evaluation images* - exactly the look-alikes that matter - far apart learns what "same
photograph" means in this domain. It trains on the index's own 64x64 grey thumbnails, so any saved index can be
given one; it works on grey images because the detector matches grey images (a copy may be greyscale anyway).

torch is imported inside the functions only: the rest of ``pipelines`` never needs it, and the detector runs without
this check (``DetectorConfig.learned = False`` or no model attached to the index).
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from pipelines.core import storage
from pipelines.core.errors import ClipError

NET_FORMAT = 1


class LearnedNetError(ClipError, ValueError):
    """A near-duplicate net file that cannot be used, or training data of the wrong shape."""


@dataclass(frozen=True)
class LearnedConfig:
    side: int = 32  # network input side (grey)
    dim: int = 64  # embedding size
    width: int = 16  # channels of the first conv layer (x2, x4 deeper)
    steps: int = 400  # optimiser steps (fixed, not time-limited, so a seed fixes the weights)
    batch: int = 128  # evaluation images per step (two synthetic copies each; the rest of the batch are negatives)
    lr: float = 3e-3
    temperature: float = 0.07
    jpeg_frac: float = 0.3  # fraction of views re-encoded as JPEG (quality 10..40)
    seed: int = 0
    threads: int = 1  # one thread: on a busy shared machine a second OpenMP thread mostly spins (measured 10x CPU)


def _torch():
    import torch  # noqa: PLC0415 - lazy on purpose, see the module docstring

    return torch


def _make_net(cfg: LearnedConfig):
    torch = _torch()
    nn = torch.nn
    w = cfg.width

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, w, 1), *block(w, 2 * w, 2),  # 16x16
        *block(2 * w, 2 * w, 2),  # 8x8
        *block(2 * w, 4 * w, 1), *block(4 * w, 4 * w, 2),  # 4x4
        nn.Flatten(), nn.Linear(4 * w * 16, cfg.dim),  # keeps the layout (where things are), unlike a global pool
    )


def thumbs_of(images) -> np.ndarray:
    """(N, 64, 64) uint8 grey thumbnails of PIL images, made as the evaluation index makes its thumbnails."""
    out = [np.asarray((im if im.mode == "L" else im.convert("L")).resize((64, 64), Image.Resampling.BILINEAR),
                      dtype=np.uint8) for im in images]
    return np.stack(out) if out else np.zeros((0, 64, 64), np.uint8)


# --- synthetic copies, batched in torch ---------------------------------------------------------------------------

def _views(x, g, cfg: LearnedConfig, rng: np.random.Generator):
    """One random synthetic copy of each (B, 1, 64, 64) image in [0, 1] -> (B, 1, side, side)."""
    torch = _torch()
    F = torch.nn.functional
    b = x.shape[0]

    def u(lo, hi, n=b):
        return torch.empty(n).uniform_(lo, hi, generator=g)

    # Geometry: zoom in (crop 75..100%) or out (pad), aspect distortion, rotation +-8 deg, shift, mirror.
    zoom = torch.where(torch.rand(b, generator=g) < 0.75, u(0.72, 1.0), u(1.0, 1.4))  # >1 = zoom out (pad)
    aspect = torch.exp(u(-0.2, 0.2))
    sx, sy = zoom * aspect, zoom / aspect
    ang = torch.where(torch.rand(b, generator=g) < 0.5, u(-8.0, 8.0), torch.zeros(b)) * (np.pi / 180)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    tx, ty = u(-1, 1) * (1 - torch.clamp(sx, max=1)) + u(-0.1, 0.1), u(-1, 1) * (1 - torch.clamp(sy, max=1)) + u(-0.1, 0.1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], 1),
                         torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1)
    mid = 48
    grid = F.affine_grid(theta, (b, 1, mid, mid), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(x), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fill = torch.where(torch.rand(b, generator=g) < 0.6, torch.randint(0, 2, (b,), generator=g).float(), u(0, 1))
    y = warped + (1 - inside) * fill.view(b, 1, 1, 1)
    # Banner: a solid strip of 10..22% of the height at the top or bottom with random "text" blobs in it.
    has = torch.rand(b, generator=g) < 0.2
    for i in torch.nonzero(has).flatten().tolist():
        h = int(rng.integers(5, 11))
        top = bool(rng.random() < 0.5)
        rows = slice(0, h) if top else slice(mid - h, mid)
        col = float(rng.choice([0.0, 1.0, rng.random()]))
        strip = torch.full((h, mid), col)
        ink = torch.from_numpy(rng.random((h, mid)) < 0.25).float()
        ink[: h // 4], ink[h - h // 4:] = 0, 0
        y[i, 0, rows] = strip * (1 - ink) + (1 - round(col)) * ink
    # Photometric: brightness, contrast, gamma (what hue/saturation/value jitter does to grey levels), noise.
    m = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - m) * u(0.7, 1.35).view(b, 1, 1, 1) + m + u(-0.15, 0.15).view(b, 1, 1, 1)
    y = y.clamp(0, 1) ** torch.exp(u(-0.35, 0.35)).view(b, 1, 1, 1)
    # Down/up-scaling: a third of the views pass through 12..28 px.
    small = torch.rand(b, generator=g) < 0.33
    if small.any():
        s = int(rng.integers(12, 29))
        y[small] = F.interpolate(F.interpolate(y[small], size=(s, s), mode="area"), size=(mid, mid),
                                 mode="bilinear", align_corners=False)
    y = (y + torch.randn(y.shape, generator=g) * float(rng.uniform(0, 0.02))).clamp(0, 1)
    # JPEG at low quality through PIL (a few ms per batch at this size).
    arr = (y[:, 0].numpy() * 255 + 0.5).astype(np.uint8)
    for i in np.flatnonzero(rng.random(b) < cfg.jpeg_frac):
        buf = io.BytesIO()
        Image.fromarray(arr[i], "L").save(buf, "JPEG", quality=int(rng.integers(10, 41)))
        arr[i] = np.asarray(Image.open(buf))
    return _prep(torch.from_numpy(arr), cfg)


def _prep(u8, cfg: LearnedConfig):
    """(N, h, w) uint8 tensor -> normalised (N, 1, side, side) float network input."""
    torch = _torch()
    x = u8.float().unsqueeze(1) / 255.0
    x = torch.nn.functional.interpolate(x, size=(cfg.side, cfg.side), mode="area")
    # Per-image standardisation: contrast and brightness edits should not move the embedding.
    m, s = x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)
    return (x - m) / (s + 0.05)


# --- model ----------------------------------------------------------------------------------------------------------

class NearDupEmbedder:
    """A trained near-duplicate embedding net (weights as numpy arrays, so it pickles and saves without torch)."""

    def __init__(self, cfg: LearnedConfig, state: dict[str, np.ndarray]):
        self.cfg, self.state = cfg, state
        self._net = None

    def _module(self):
        if self._net is None:
            torch = _torch()
            net = _make_net(self.cfg)
            net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()})
            self._net = net.eval()
        return self._net

    def embed_thumbs(self, thumbs: np.ndarray, batch: int = 1024) -> np.ndarray:
        """(N, 64, 64) uint8 grey thumbnails -> (N, dim) float32 unit vectors."""
        torch = _torch()
        net, out = self._module(), []
        with torch.no_grad():
            for s in range(0, len(thumbs), batch):
                z = net(_prep(torch.from_numpy(np.ascontiguousarray(thumbs[s:s + batch])), self.cfg))
                out.append(torch.nn.functional.normalize(z, dim=1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.cfg.dim), np.float32)

    def embed(self, images) -> np.ndarray:
        return self.embed_thumbs(thumbs_of(images))

    def save(self, path: str) -> None:
        """One .npz (weights + config), written whole through :mod:`storage` (local or s3://)."""
        meta = {"format": NET_FORMAT, "config": asdict(self.cfg)}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **{f"w/{k}": v for k, v in self.state.items()})
        storage.write_bytes_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str) -> "NearDupEmbedder":
        try:
            z = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
            meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError) as exc:
            raise LearnedNetError(f"{path}: not a near-duplicate net written by NearDupEmbedder.save ({exc})") from None
        if meta.get("format") != NET_FORMAT:
            raise LearnedNetError(f"{path}: near-duplicate net format {meta.get('format')} != {NET_FORMAT}; retrain it")
        state = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
        return cls(LearnedConfig(**meta["config"]), state)


def train_embedder(thumbs: np.ndarray, cfg: LearnedConfig | None = None, log=None) -> NearDupEmbedder:
    """Train on (N, 64, 64) uint8 grey thumbnails of the evaluation images (N >= 2) with symmetric InfoNCE.

    Each step draws ``batch`` evaluation images, makes two independent synthetic copies of each, and asks every copy
    to pick its sibling among all copies in the batch. Deterministic for a given seed and thread count.
    """
    cfg = cfg or LearnedConfig()
    thumbs = np.asarray(thumbs, dtype=np.uint8)
    if thumbs.ndim != 3 or thumbs.shape[1:] != (64, 64) or len(thumbs) < 2:
        raise LearnedNetError(f"train_embedder: expected (N >= 2, 64, 64) uint8 thumbnails, got {thumbs.shape}")
    torch = _torch()
    F = torch.nn.functional
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        net = _make_net(cfg)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        warm = max(1, cfg.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
        data = torch.from_numpy(thumbs).float().unsqueeze(1) / 255.0
        bsz = min(cfg.batch, len(thumbs))
        net.train()
        for step in range(cfg.steps):
            idx = torch.from_numpy(rng.choice(len(thumbs), bsz, replace=False))
            x = data[idx]
            v = torch.cat([_views(x, g, cfg, rng), _views(x, g, cfg, rng)])
            z = F.normalize(net(v), dim=1)
            logits = z @ z.T / cfg.temperature
            logits.fill_diagonal_(float("-inf"))
            target = torch.cat([torch.arange(bsz, 2 * bsz), torch.arange(0, bsz)])
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log and (step % 100 == 0 or step == cfg.steps - 1):
                log(f"near-dup net step {step}: InfoNCE {loss.item():.3f}")
        state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    finally:
        torch.set_num_threads(prev_threads)
    return NearDupEmbedder(cfg, state)
