"""What a crawl worker process costs to start: img2dataset's plain spawn pool vs clipline's (pipelines.crawl.processes).

    .venv/bin/python benchmarks/crawl_worker_start_bench.py [--repeats 5] [--json out.json]

Each run starts a one-process spawn pool (img2dataset's multiprocessing distributor starts its workers this way and
replaces each after 5 shards), hands it one task that unpickles what that crawl's tasks carry, and reports the
worker's CPU seconds and peak RSS:

- ``plain``: img2dataset's own crawl: a plain spawn pool, and img2dataset's ``Downloader`` with its ``Resizer``;
- ``clipline``: clipline's pool (:mod:`pipelines.crawl.processes`) and the ``CrawlDownloader`` a round hands it
  (``pipelines.crawl.engine.make_downloader``: its resizer is loaded only where it is called).

The downloaders are built from one ``CrawlConfig`` and pickled once, in this process. Runs alternate plain / clipline
in one process, so drift in the machine's speed hits both alike.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _task(blob: bytes):
    import pickle

    pickle.loads(blob)  # what the pool does with each task's downloader
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # Peak RSS of this process image (VmHWM starts again at exec; ru_maxrss would carry the parent's from the fork).
    with open("/proc/self/status") as status:
        hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_mib": hwm_kib / 1024,
            "torch": "torch" in sys.modules, "img2dataset_main": "img2dataset.main" in sys.modules,
            "albumentations": "albumentations" in sys.modules,
            "wandb_loaded": "wandb" in sys.modules and hasattr(sys.modules["wandb"], "init")}


def downloaders(tmp: str) -> dict[str, bytes]:
    """The pickled downloader of each variant, as its crawl sends it with every shard."""
    import pickle

    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    from pipelines.crawl import CrawlConfig
    from pipelines.crawl.engine import make_downloader, worker_settings

    config = CrawlConfig(image_size=128)
    columns = ["url", "caption", "uid", "key_hint"]
    ours = make_downloader(config, column_list=columns, out_dir=tmp,
                           settings=worker_settings(config, tmp, None, None))
    resizer = Resizer(image_size=config.image_size, resize_mode=config.resize_mode,
                      resize_only_if_bigger=config.resize_only_if_bigger, encode_quality=config.encode_quality,
                      encode_format=config.encode_format, min_image_size=config.min_image_size,
                      max_image_area=config.max_image_pixels)
    plain = Downloader(sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=config.thread_count,
                       save_caption=True, extract_exif=False, output_folder=tmp, column_list=columns,
                       timeout=config.timeout, number_sample_per_shard=config.number_sample_per_shard,
                       oom_shard_count=5, compute_hash=config.compute_hash, verify_hash_type=None,
                       encode_format=config.encode_format, retries=config.retries,
                       user_agent_token=config.user_agent_token, disallowed_header_directives=None)
    return {"plain": pickle.dumps(plain), "clipline": pickle.dumps(ours)}


def _one(variant: str, blob: bytes) -> dict:
    from pipelines.crawl.processes import start_crawl_process

    ctx = multiprocessing.get_context("spawn")
    init = start_crawl_process if variant == "clipline" else None
    with ctx.Pool(1, maxtasksperchild=5, initializer=init) as pool:
        return pool.map(_task, [blob])[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    order = [v for i in range(args.repeats) for v in (("plain", "clipline") if i % 2 == 0 else ("clipline", "plain"))]
    import tempfile

    runs = {"plain": [], "clipline": []}
    with tempfile.TemporaryDirectory() as tmp:
        blobs = downloaders(tmp)
        for v in order:
            r = _one(v, blobs[v])
            runs[v].append(r)
            print(f"{v:9s} cpu {r['cpu_s']:.2f} s  peak RSS {r['max_rss_mib']:.0f} MiB  torch {r['torch']}  "
                  f"albumentations {r['albumentations']}  wandb {r['wandb_loaded']}", flush=True)
    summary = {v: {"cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
                   "max_rss_mib_median": statistics.median(r["max_rss_mib"] for r in rs),
                   "torch_imported": any(r["torch"] for r in rs),
                   "albumentations_imported": any(r["albumentations"] for r in rs),
                   "wandb_imported": any(r["wandb_loaded"] for r in rs)} for v, rs in runs.items()}
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "order": order, "runs": runs, "summary": summary,
              "load_avg_1m_at_end": os.getloadavg()[0]}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
