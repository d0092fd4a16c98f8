"""Writing small webdataset shards (`{key}.jpg`, `{key}.txt`, `{key}.json` + `sizes.json`), and a synthetic
coloured-shapes captioned set, for tests, benchmarks and smoke runs of the trainer.

Tar members get fixed mtimes and owners, so the same samples give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.core import storage

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 190),
    "orange": (250, 140, 10),
}
SHAPES = ("circle", "square", "triangle")
CAPTION_TEMPLATES = ("a {c} {s}.", "a photo of a {c} {s}.", "{c} {s} on a grey background", "a picture showing a {c} {s}")


@dataclass
class Sample:
    key: str
    jpeg: bytes
    caption: str
    meta: dict


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[Sample], out_dir: str | Path, samples_per_shard: int) -> list[Path]:
    """Write NNNNN.tar shards (each whole or not at all, through pipelines.core.storage: a local directory or an
    s3:// prefix) and sizes.json last. Returns the shard paths (Path objects for a local directory)."""
    out = str(out_dir)
    names: list[str] = []
    sizes: dict[str, int] = {}
    batch: list[Sample] = []

    def flush() -> None:
        name = f"{len(names):05d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in batch:
                _add_member(tar, f"{sample.key}.jpg", sample.jpeg)
                _add_member(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"))
                _add_member(tar, f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True).encode("utf-8"))
        storage.write_bytes_atomic(storage.join(out, name), buf.getvalue())
        names.append(name)
        sizes[name] = len(batch)
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) == samples_per_shard:
            flush()
    if batch:
        flush()
    storage.write_bytes_atomic(storage.join(out, "sizes.json"), json.dumps(sizes, indent=1, sort_keys=True).encode())
    return [Path(storage.join(out, n)) if not storage.is_s3(out) else storage.join(out, n) for n in names]


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def shape_image(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One shape of a named colour at a random place and size on a noisy grey background."""
    bg = rng.integers(100, 156, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(bg)
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size // 3, size // 2 + 1))
    x0 = int(rng.integers(0, size - extent))
    y0 = int(rng.integers(0, size - extent))
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return image


def synthetic_shape_samples(n: int, seed: int = 0, size: int = 64, key_prefix: str = "s") -> list[Sample]:
    """n captioned shape images; the caption names the colour and the shape (18 classes)."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    out = []
    for i in range(n):
        colour = colours[int(rng.integers(len(colours)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(c=colour, s=shape)
        key = f"{key_prefix}{i:07d}"
        meta = {"uid": key, "url": f"synthetic://{key}", "caption": caption, "entry_ids": [colour, shape]}
        out.append(Sample(key, jpeg_bytes(shape_image(colour, shape, rng, size)), caption, meta))
    return out
