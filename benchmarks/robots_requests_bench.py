"""robots.txt requests a crawl makes, counted by the servers: clipline's crawl with ``--processes`` crawl processes on
the synthetic web's hosts (600 by default), both rounds. Prints one JSON line: the wall time, the download phase,
the requests the crawl reported, the robots.txt requests the servers received, and the most any host received.

The baseline is an older checkout (before stop 16 every crawl process fetched robots.txt for itself): run the same
command with ``--repo`` naming that checkout, on the same web (``--web-cache``), right before or after.

usage: python benchmarks/robots_requests_bench.py [--urls 3000] [--hosts 600] [--processes 2]
                                                   [--web-cache DIR] [--repo PATH]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=3000)
    ap.add_argument("--hosts", type=int, default=600)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--shard", type=int, default=500)
    ap.add_argument("--web-cache", default=None)
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    args = ap.parse_args(argv)
    sys.path.insert(0, args.repo)
    sys.path.insert(0, os.path.join(args.repo, "benchmarks"))
    import crawl_bench as cb
    from pipelines.crawl import CrawlConfig
    from pipelines.synthweb import generate_web

    work = Path(tempfile.mkdtemp(prefix="robots_bench_"))
    web = Path(args.web_cache or work) / f"healthy-web-{args.urls}-96-192"
    generate_web(web, args.urls, seed=0, failure_rate=0.0, min_per_failure_mode=0, heldout_per_class=1,
                 min_side=96, max_side=192)
    servers = cb._serve(web, args.hosts)
    try:
        cand = work / "candidates.parquet"
        cb._candidates(servers[0].materialise_url_list()["parquet"], servers, cand)
        config = CrawlConfig(allow_cidrs=cb.ALLOW, processes=args.processes, thread_count=32,
                             number_sample_per_shard=args.shard, image_size=128, retries=1, timeout=10,
                             max_download_seconds=10, recrawl_rounds=1)
        r = cb._clipline(config, cand, work / "crawl", work / "staging")
        robots = [s.hits["/robots.txt"] for s in servers]
        t = r["host_totals"]
        print(json.dumps({"repo": args.repo, "processes": args.processes, "urls": args.urls,
                          "hosts": args.hosts, "hosts_with_robots_requests": sum(1 for x in robots if x),
                          "wall_s": round(r["wall_s"], 2), "download_s": round(r["download_s"], 2),
                          "requests_reported": t["requests"], "images": t["downloaded"],
                          "robots_served": sum(robots), "robots_max_per_host": max(robots)}), flush=True)
    finally:  # each server's shutdown waits for its poll interval: stop them together
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(lambda s: s.stop(), servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
