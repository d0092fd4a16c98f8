"""Benchmark: the images stage's perceptual hashing vs a plain ``imagehash.phash(Image.open(path))`` loop.

Same images, same run, CPU time of this process (images/s per core; BLAS held to one thread). Images are the
shards' images as the build writes them: originals passed through img2dataset's own ``Resizer`` with the crawl's
settings (keep_ratio_largest 256, resize_only_if_bigger, JPEG q95). Sources: ``synthweb`` (the synthetic web's
pictures), ``cifar`` (real photos: CIFAR-10 JPEGs from the shared data, upscaled to 128-256 px and re-encoded;
skipped when the shared data is absent), ``noisy`` (gradients + noise), or ``--shards 'DIR/*.tar'``.

Rows: the reference loop; imagehash pHash + dHash (the stage stores both); the previous stage path (full decode,
``phash64_batch`` + ``dhash64_batch``); and ``pipelines.images.fast_hash`` with each decode (exact, luma, reduced).
Every project row computes pHash and dHash; agreement is against imagehash's pHash (and dHash) of the same file.

    .venv/bin/python benchmarks/hash_bench.py [--n 1500] [--source synthweb|cifar|noisy] [--shards 'DIR/*.tar'] \
        [--repeats 3] [--out docs/benchmarks_images.md]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.core import storage  # noqa: E402
from pipelines.decontam.hashing import dhash64_batch, phash64_batch  # noqa: E402
from pipelines.images import fast_hash  # noqa: E402
from pipelines.images.checks import inspect_image  # noqa: E402

BATCH = 256


def shared_data_dir() -> Path:
    env = os.environ.get("CLIPLINE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def as_the_build_writes(data: bytes) -> bytes:
    """Re-encode like the crawl: img2dataset's Resizer with the project's CrawlConfig defaults."""
    from img2dataset.resizer import Resizer

    from pipelines.crawl.config import CrawlConfig

    c = CrawlConfig()
    resizer = Resizer(image_size=c.image_size, resize_mode=c.resize_mode,
                      resize_only_if_bigger=c.resize_only_if_bigger, encode_quality=c.encode_quality,
                      encode_format=c.encode_format)
    out, *_rest, err = resizer(io.BytesIO(data))
    if err is not None:
        raise ValueError(f"img2dataset's resizer refused an image: {err}")
    return out


def synthweb_images(n: int) -> list[bytes]:
    from pipelines.synthweb.generator import generate_web

    with tempfile.TemporaryDirectory() as tmp:
        generate_web(tmp, int(n * 1.3) + 10, seed=1, heldout_per_class=0)
        return [as_the_build_writes(f.read_bytes()) for f in sorted(Path(tmp).glob("images/orig/*.jpg"))[:n]]


def cifar_images(n: int) -> list[bytes] | None:
    path = shared_data_dir() / "cifar10" / "cifar10-jpeg.parquet"
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    jpegs = pq.read_table(path, columns=["jpeg"]).slice(0, n).column("jpeg").to_pylist()
    rng = random.Random(0)
    out = []
    for b in jpegs:
        side = rng.randint(128, 256)
        im = Image.open(io.BytesIO(b)).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(as_the_build_writes(buf.getvalue()))
    return out


def noisy_image(i: int) -> bytes:
    rng = random.Random(i)
    w, h = rng.randint(64, 256), rng.randint(64, 256)
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    c0, c1 = np.array([rng.random() for _ in range(3)]), np.array([rng.random() for _ in range(3)])
    img = Image.fromarray(((c0 * (1 - x) * (1 - y) + c1 * x * y) * 255).clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 5)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randrange(8, w), y0 + rng.randrange(8, h))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = np.random.default_rng(i).normal(0, 12, (h, w, 3))
    img = Image.fromarray((np.asarray(img, np.float64) + noise).clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.filter(ImageFilter.GaussianBlur(0.6)).save(buf, "JPEG", quality=rng.choice([75, 85, 95]))
    return as_the_build_writes(buf.getvalue())


def images_from_shards(pattern: str, limit: int) -> list[bytes]:
    out = []
    for uri in storage.expand([pattern]):
        with storage.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    out.append(tar.extractfile(m).read())
                    if len(out) >= limit:
                        return out
    return out


def reference_phash(paths):
    return [int(str(imagehash.phash(Image.open(p))), 16) for p in paths], None


def reference_both(paths):
    p, d = [], []
    for path in paths:
        img = Image.open(path)
        p.append(int(str(imagehash.phash(img)), 16))
        d.append(int(str(imagehash.dhash(img)), 16))
    return p, d


def previous_stage(paths):
    """The images stage before fast_hash: inspect_image (full decode) + phash64_batch + dhash64_batch."""
    p, d = [], []
    for i in range(0, len(paths), BATCH):
        imgs = [inspect_image(Path(x).read_bytes()).image for x in paths[i:i + BATCH]]
        p.extend(int(h) for h in phash64_batch(imgs))
        d.extend(int(h) for h in dhash64_batch(imgs))
    return p, d


def fast(decode: str):
    def run(paths):
        p, d = [], []
        for i in range(0, len(paths), BATCH):
            b = fast_hash.hashes_from_jpeg_bytes([Path(x).read_bytes() for x in paths[i:i + BATCH]], decode=decode)
            p.extend(int(h) for h in b.phash)
            d.extend(int(h) for h in b.dhash)
        return p, d
    return run


def _pil_decode(decode: str):
    def run(paths):
        for x in paths:
            fast_hash.open_for_hash(Path(x).read_bytes(), decode)
        return None
    return run


def _cv2_decode(flag_name: str):
    def run(paths):
        import cv2

        # OpenCV would apply EXIF orientation; imagehash (Pillow) does not.
        flag = getattr(cv2, flag_name) | cv2.IMREAD_IGNORE_ORIENTATION
        for x in paths:
            cv2.imdecode(np.frombuffer(Path(x).read_bytes(), np.uint8), flag)
        return None
    return run


# Parts of the work, each alone (read bytes + that step), to show where a per-image floor comes from.
FLOORS = {
    "read bytes + Image.open (header only)": lambda paths: [Image.open(io.BytesIO(Path(x).read_bytes()))
                                                             for x in paths] and None,
    "read + Pillow full RGB decode (open + load)": _pil_decode("exact"),
    "read + Pillow luma decode, full size (draft L)": _pil_decode("luma"),
    "read + Pillow luma decode, reduced >= 64 px": _pil_decode("reduced"),
    "read + OpenCV colour decode, full size (libjpeg-turbo, no Pillow)": _cv2_decode("IMREAD_COLOR_BGR"),
    "read + OpenCV grey decode, full size (libjpeg-turbo, no Pillow)": _cv2_decode("IMREAD_GRAYSCALE"),
    "read + OpenCV grey decode at 1/8 scale (~ entropy decoding alone)": _cv2_decode("IMREAD_REDUCED_GRAYSCALE_8"),
}

VARIANTS = {
    "imagehash pHash + dHash loop (one Image.open)": reference_both,
    "previous stage: full decode + phash64_batch + dhash64_batch": previous_stage,
    "fast_hash exact (pHash + dHash)": fast("exact"),
    "fast_hash luma (pHash + dHash)": fast("luma"),
    "fast_hash reduced >= 64 px (pHash + dHash)": fast("reduced"),
}


def measure(paths: list[str], repeats: int):
    """Best CPU time of ``repeats`` interleaved rounds for the reference and every variant."""
    times: dict[str, list[float]] = {}
    results = {}
    with threadpool_limits(1):  # per core: no BLAS helper threads
        for _ in range(repeats):
            for name, fn in {"reference": reference_phash, **VARIANTS, **FLOORS}.items():
                t0 = time.process_time()
                results[name] = fn(paths)
                times.setdefault(name, []).append(time.process_time() - t0)
    return results, {k: min(v) for k, v in times.items()}


def agreement(got, ref) -> tuple[float, float, int]:
    dist = np.array([(a ^ b).bit_count() for a, b in zip(got, ref)])
    return float((dist == 0).mean()), float((dist <= 2).mean()), int(dist.max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--source", choices=("synthweb", "cifar", "noisy"), default="synthweb")
    ap.add_argument("--shards", default=None, help="read images from these shards instead of generating them")
    ap.add_argument("--repeats", type=int, default=3, help="best of N interleaved timings for each variant")
    ap.add_argument("--out", default=None, help="write the results table (Markdown) here")
    args = ap.parse_args(argv)

    if args.shards:
        datas, source = images_from_shards(args.shards, args.n), args.shards
    elif args.source == "synthweb":
        datas, source = synthweb_images(args.n), "synthetic web pictures as the crawl writes them"
    elif args.source == "cifar":
        datas = cifar_images(args.n)
        if datas is None:
            print(f"no shared data at {shared_data_dir()}: skipping the cifar source")
            return 0
        source = "CIFAR-10 photos upscaled to 128-256 px, as the crawl writes them"
    else:
        datas = [noisy_image(i) for i in range(args.n)]
        source = "gradients + noise, 64-256 px, as the crawl writes them"
    sizes = [Image.open(io.BytesIO(d)).size for d in datas]

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, d in enumerate(datas):
            p = f"{tmp}/{i:06d}.jpg"
            Path(p).write_bytes(d)
            paths.append(p)
        results, best = measure(paths, args.repeats)
    ref_p, ref_d = results["imagehash pHash + dHash loop (one Image.open)"]
    n = len(paths)
    t_ref = best["reference"]
    lines = [f"Images: {n} ({source}; sides {min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px); "
             f"{os.cpu_count()} CPUs visible, {platform.machine()}, Python {platform.python_version()}; "
             f"CPU time of this process, best of {args.repeats}.", "",
             "| variant | images/s per core | speed-up vs imagehash.phash loop | pHash identical | pHash within 2 "
             "bits | pHash max bits | dHash identical | dHash within 2 bits |",
             "|---|---|---|---|---|---|---|---|",
             f"| `imagehash.phash(Image.open(path))` loop (reference) | {n / t_ref:.0f} | 1.00x | - | - | - | - | - |"]
    for name in VARIANTS:
        p, d = results[name]
        t = best[name]
        pi, p2, pm = agreement(p, ref_p)
        di, d2, _ = agreement(d, ref_d)
        lines.append(f"| {name} | {n / t:.0f} | {t_ref / t:.2f}x | {pi:.1%} | {p2:.1%} | {pm} | {di:.1%} | {d2:.1%} |")
    lines += ["", "Where the time goes (each part alone, same run): the share of the reference loop's time a part "
              "takes bounds the speed-up of any path that includes it.", "",
              "| part | us per image | share of reference time | best possible speed-up with it |", "|---|---|---|---|",
              f"| reference loop, whole | {1e6 * t_ref / n:.0f} | 100% | 1.00x |"]
    for name in FLOORS:
        t = best[name]
        lines.append(f"| {name} | {1e6 * t / n:.0f} | {t / t_ref:.0%} | {t_ref / t:.2f}x |")
    table = "\n".join(lines)
    print(table)
    return _write(args, argv, table)


def _write(args, argv, table: str) -> int:
    if args.out:
        cmd = "benchmarks/hash_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = f"### `{cmd.strip()}`\n\n" + table + "\n\n"
        out = Path(args.out)
        text = out.read_text() if out.exists() else HEADER
        marker = f"### `{cmd.strip()}`"
        if marker in text:  # replace this command's previous section
            start = text.index(marker)
            end = text.find("\n### ", start + 1)
            text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
        else:
            text += section
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return 0


HEADER = """# Images stage benchmarks

## Perceptual hashing: project vs plain imagehash loop

Reference: `imagehash.phash(Image.open(path))` per file. Project rows read the file's bytes and compute pHash **and**
dHash (the images stage stores both), through `pipelines.images.fast_hash` (one decode per image, Pillow's LANCZOS
resize as exact float64 matrix products per group of same-sized images, one DCT per batch of 256). Decodes:
`exact` = full decode + Pillow's `convert("L")` (bit-exact; the stage's default, `exact_hashes=True`), `luma` =
JPEG luma channel at full size (`Image.draft("L", size)`; `exact_hashes=False`), `reduced` = luma at the smallest
JPEG DCT scale >= 64 px (`exact_hashes=False, reduced_decode=True`). Images/s per core = images / CPU time of the
process (BLAS held to one thread), best of 3 interleaved rounds. Agreement is against imagehash's hashes of the
same file. Goal from the issue: >= 4x the reference, pHash identical on >= 90%, within 2 bits on >= 99%.

"""


if __name__ == "__main__":
    sys.exit(main())
