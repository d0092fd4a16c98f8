"""The crawl's per-image columns (sha256, size, pHash, dHash of the published image): Pillow's decode vs OpenCV's.

    .venv/bin/python benchmarks/crawl_hash_bench.py [--pictures 1500] [--repeats 6] [--json out.json]

The published images are made as a crawl makes them: pictures of the synthetic web (room backgrounds, 96-192 px)
through img2dataset's Resizer (128 px, keep_ratio, JPEG quality 95). Two ways to compute their columns, alternated
in one process, CPU per image (median of the runs):

- ``pillow``: the columns as the crawl computed them until stop 20 (the same function with the OpenCV path off:
  ``checks.inspect_image`` decodes with Pillow, ``convert("L")``, the LANCZOS matrices, the DCT);
- ``opencv``: ``pipelines.crawl.processing.image_columns`` now (:data:`JPEG_GREY`: OpenCV decodes, Pillow converts).

Every image's columns are compared between the two, and a sample with imagehash.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pillow_columns(img_str: bytes, max_pixels: int) -> dict:
    """The columns as computed before: ``image_columns`` with the OpenCV path switched off (Pillow decodes)."""
    from pipelines.crawl.processing import JPEG_GREY, image_columns

    JPEG_GREY.enabled = False
    try:
        return image_columns(img_str, max_pixels)
    finally:
        JPEG_GREY.enabled = True


def published_images(n: int) -> list[bytes]:
    from img2dataset.resizer import Resizer

    from pipelines.synthweb import generate_web

    resizer = Resizer(image_size=128, resize_mode="keep_ratio", resize_only_if_bigger=False, encode_quality=95,
                      encode_format="jpg", min_image_size=0, max_image_area=64_000_000)
    out = []
    with tempfile.TemporaryDirectory(prefix="crawl_hash_bench_") as tmp:
        web = Path(tmp)
        generate_web(web, n, seed=3, failure_rate=0.0, min_per_failure_mode=0, heldout_per_class=1, min_side=96,
                     max_side=192, backgrounds="room")
        for p in sorted((web / "images").rglob("*.jpg")):
            img, *_rest, err = resizer(io.BytesIO(p.read_bytes()))
            if err is None:
                out.append(img)
    return out


def main(argv=None) -> int:
    import imagehash
    from PIL import Image

    from pipelines.crawl.processing import JPEG_GREY, image_columns

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pictures", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    images = published_images(args.pictures)
    differ = sum(pillow_columns(x, 64_000_000) != image_columns(x, 64_000_000) for x in images)
    sample = images[:: max(1, len(images) // 300)]
    def imagehash_columns(x: bytes) -> dict:
        img = Image.open(io.BytesIO(x))
        return {"phash": int(str(imagehash.phash(img)), 16), "dhash": int(str(imagehash.dhash(img)), 16)}

    not_imagehash = sum({k: image_columns(x, 64_000_000)[k] for k in ("phash", "dhash")} != imagehash_columns(x)
                        for x in sample)
    runs: dict[str, list[float]] = {"pillow": [], "opencv": []}
    fns = {"pillow": pillow_columns, "opencv": image_columns}
    for i in range(args.repeats):
        for name in (("pillow", "opencv") if i % 2 == 0 else ("opencv", "pillow")):
            t0 = time.process_time()
            for x in images:
                fns[name](x, 64_000_000)
            runs[name].append(1000 * (time.process_time() - t0) / len(images))
    med = {k: statistics.median(v) for k, v in runs.items()}
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "images": len(images), "mean_bytes": sum(map(len, images)) / len(images),
              "columns_differ": differ, "imagehash_sample": len(sample), "imagehash_differ": not_imagehash,
              "opencv_checked_against_pillow": JPEG_GREY.seen, "opencv_mismatches": JPEG_GREY.mismatches,
              "ms_per_image": runs, "median_ms_per_image": med, "ratio": med["opencv"] / med["pillow"],
              "load_avg_1m_at_end": os.getloadavg()[0]}
    print(json.dumps({k: v for k, v in report.items() if k != "ms_per_image"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
