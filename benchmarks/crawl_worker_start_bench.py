"""What a crawl worker process costs to start: img2dataset's plain spawn pool vs clipline's (pipelines.crawl.processes).

    .venv/bin/python benchmarks/crawl_worker_start_bench.py [--repeats 5] [--json out.json]

Each run starts a one-process spawn pool (img2dataset's multiprocessing distributor starts its workers this way and
replaces each after 5 shards), hands it one task that unpickles what a crawl task unpickles (``CrawlDownloader``,
hence ``pipelines.crawl.worker`` and its img2dataset, webdataset... imports), and reports the worker's CPU seconds
and peak RSS. Runs alternate plain / clipline in one process, so drift in the machine's speed hits both alike.
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


def _task(_):
    import pipelines.crawl.worker  # noqa: F401 - what unpickling a CrawlDownloader imports

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_mib": ru.ru_maxrss / 1024,
            "torch": "torch" in sys.modules, "img2dataset_main": "img2dataset.main" in sys.modules}


def _one(variant: str) -> dict:
    from pipelines.crawl.processes import start_crawl_process

    ctx = multiprocessing.get_context("spawn")
    init = start_crawl_process if variant == "clipline" else None
    with ctx.Pool(1, maxtasksperchild=5, initializer=init) as pool:
        return pool.map(_task, [0])[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    order = [v for i in range(args.repeats) for v in (("plain", "clipline") if i % 2 == 0 else ("clipline", "plain"))]
    runs = {"plain": [], "clipline": []}
    for v in order:
        r = _one(v)
        runs[v].append(r)
        print(f"{v:9s} cpu {r['cpu_s']:.2f} s  peak RSS {r['max_rss_mib']:.0f} MiB  torch {r['torch']}", flush=True)
    summary = {v: {"cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
                   "max_rss_mib_median": statistics.median(r["max_rss_mib"] for r in rs),
                   "torch_imported": any(r["torch"] for r in rs)} for v, rs in runs.items()}
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "order": order, "runs": runs, "summary": summary,
              "load_avg_1m_at_end": os.getloadavg()[0]}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
