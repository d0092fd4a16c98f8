"""The copy descriptor: a small CNN that maps an image to a unit vector so that a copy (shifted by a few pixels,
re-cropped, re-coloured, greyed, JPEG'd, blurred, captioned, padded) lands close to its source and a different
picture of the same kind does not. It is the recall-first candidate generator of the detector (:mod:`detector`):
perceptual hashes move by more than any usable radius when a 32 px image shifts by a pixel or two; the descriptor
does not.

Inference is a numpy forward pass (im2col + BLAS): the data plane needs neither torch nor ``clip_train``, and a
Beam worker loads the weights once (a few hundred kB). The weights ship with the package (``copy_descriptor.npz``)
together with their training recipe, fingerprint and calibrated thresholds; they are trained by
``python -m pipelines.decontam.descriptor_train`` on procedural images (:mod:`procedural`) and calibrated on
procedural canvases of unseen styles (:mod:`calibrate`), never on an evaluation set it is reported on.

Input: the image in grey (PIL ``L``), resized to 32 x 32 (antialiased bilinear), standardised per image (so
brightness/contrast edits do not move it). Mirror tolerance is given by the index, which holds each evaluation
image and its mirror image.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.core import storage
from pipelines.core.errors import ClipError

FORMAT = 1
SIDE = 32  # network input side
DEFAULT_WEIGHTS = Path(__file__).with_name("copy_descriptor.npz")
# (name, input channels, output channels, stride) of the 3x3 conv layers; then 2x2 average pooling and a linear
# layer to the descriptor. Mirrored by descriptor_train.make_net (a test checks both give the same vectors).
ARCH = (("c1", 1, 16, 1), ("c2", 16, 32, 2), ("c3", 32, 64, 2), ("c4", 64, 64, 1))


class DescriptorError(ClipError):
    """A descriptor weights file that cannot be used (missing, not written by descriptor_train, other format)."""


def prepare(images: Sequence[Image.Image]) -> np.ndarray:
    """(N, 32, 32) uint8 grey network inputs of PIL images (any mode, any size)."""
    out = np.empty((len(images), SIDE, SIDE), np.uint8)
    for i, im in enumerate(images):
        g = im if im.mode == "L" else im.convert("L")
        out[i] = np.asarray(g.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.uint8)
    return out


def standardise(u8: np.ndarray) -> np.ndarray:
    """(N, 32, 32) uint8 -> (N, 32, 32, 1) float32, zero mean and unit-ish variance per image."""
    x = u8.astype(np.float32) / 255.0
    m = x.mean(axis=(1, 2), keepdims=True)
    s = x.std(axis=(1, 2), keepdims=True)
    return ((x - m) / (s + 0.05))[..., None]


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """NHWC 3x3 convolution, padding 1, as torch's Conv2d (w: (out, in, 3, 3)), via im2col + one matmul. The
    columns are filled from nine strided slices (contiguous runs of channels), then one BLAS product."""
    n, h, wd, c = x.shape
    xp = np.zeros((n, h + 2, wd + 2, c), np.float32)
    xp[:, 1:-1, 1:-1] = x
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    cols = np.empty((n, ho, wo, 9, c), np.float32)
    k = 0
    for dy in range(3):
        for dx in range(3):
            cols[:, :, :, k, :] = xp[:, dy:dy + stride * ho:stride, dx:dx + stride * wo:stride, :]
            k += 1
    wm = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)  # (out, kh, kw, in): the columns' order
    out = cols.reshape(n * ho * wo, 9 * c) @ wm.T
    out += b
    return out.reshape(n, ho, wo, w.shape[0])


@dataclass
class CopyDescriptor:
    """Weights (BatchNorm folded into the convolutions) plus what the file says about them."""

    weights: dict[str, np.ndarray]
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.weights["fc.w"].shape[0])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def threshold(self, name: str) -> float:
        """A calibrated threshold from the weights file (``candidate``, ``margin``)."""
        return float(self.meta["thresholds"][name])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, 32, 32, 1) standardised inputs -> (N, dim) float32 unit vectors."""
        for name, _, _, stride in ARCH:
            x = _conv3x3(x, self.weights[f"{name}.w"], self.weights[f"{name}.b"], stride)
            np.maximum(x, 0, out=x)
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))  # 2x2 average pool -> 4x4
        # Flatten in torch's NCHW order so the linear layer's weights are used as trained.
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(n, -1)
        z = x @ self.weights["fc.w"].T + self.weights["fc.b"]
        z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
        return z.astype(np.float32)

    def embed_u8(self, u8: np.ndarray, batch: int = 512) -> np.ndarray:
        """(N, 32, 32) uint8 grey inputs -> (N, dim) unit vectors; memory bounded by ``batch``."""
        if len(u8) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([self.forward(standardise(u8[s:s + batch])) for s in range(0, len(u8), batch)])

    def embed(self, images: Sequence[Image.Image], batch: int = 512) -> np.ndarray:
        """(N, dim) unit vectors of PIL images."""
        return self.embed_u8(prepare(images), batch)

    # ------------------------------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.array(json.dumps(self.meta, sort_keys=True)),
                            **{f"w/{k}": v for k, v in sorted(self.weights.items())})
        return buf.getvalue()

    def save(self, uri: str) -> None:
        storage.write_bytes_atomic(uri, self.to_bytes())

    @classmethod
    def load(cls, uri: str | Path | None = None, *, require_thresholds: bool = True) -> "CopyDescriptor":
        """Load a weights file (default: the one shipped with the package); checks format, fingerprint and
        (unless ``require_thresholds`` is False: a freshly trained, not yet calibrated file) the thresholds."""
        where = str(uri or DEFAULT_WEIGHTS)
        try:
            data = storage.read_bytes(where)
            z = np.load(io.BytesIO(data), allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            weights = {k[2:]: np.ascontiguousarray(z[k], dtype=np.float32) for k in z.files if k.startswith("w/")}
        except (OSError, ValueError, KeyError) as exc:
            raise DescriptorError(f"{where}: not a copy-descriptor weights file ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != FORMAT:
            raise DescriptorError(f"{where}: descriptor format {meta.get('format')} != {FORMAT}; retrain it")
        if weights_fingerprint(weights) != meta.get("fingerprint"):
            raise DescriptorError(f"{where}: weights do not match the fingerprint recorded with them")
        if require_thresholds and not {"candidate", "margin"} <= set(meta.get("thresholds") or {}):
            raise DescriptorError(f"{where}: no calibrated thresholds (candidate, margin) in the file")
        return cls(weights, meta)


def weights_fingerprint(weights: dict[str, np.ndarray]) -> str:
    """sha256 over the weight arrays (name, shape, float32 bytes) in name order."""
    h = hashlib.sha256()
    for k in sorted(weights):
        a = np.ascontiguousarray(weights[k], dtype=np.float32)
        h.update(k.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def weights_fingerprint_of(uri: str | Path | None = None) -> str:
    """The fingerprint recorded in a weights file (default: the shipped one), for reuse markers."""
    return default_descriptor(str(uri) if uri else None).fingerprint


@lru_cache(maxsize=4)
def default_descriptor(uri: str | None = None) -> CopyDescriptor:
    """The shipped descriptor (loaded once per process; what a Beam worker's setup calls)."""
    return CopyDescriptor.load(uri)
