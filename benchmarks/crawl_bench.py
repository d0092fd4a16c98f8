"""Crawl benchmark: clipline's crawl vs plain img2dataset, same server, same URL list, same settings, one run.

    .venv/bin/python benchmarks/crawl_bench.py [--hostile-urls 400] [--healthy-urls 3000] [--hosts 100]
                                               [--repeats 2] [--doc docs/benchmarks_crawl.md]

Two webs, both the synthetic web's generator and server (``pipelines.synthweb``):

1. Hostile: the synthetic web's failure kinds (stalls, slow-drip bodies under 64 KB, truncated bodies, 5xx, a 503
   that heals, redirect loops, a redirect to a private address, bombs, opt-outs...) served by 10 hosts
   (127.0.0.10-.19). Plain img2dataset makes one pass; clipline makes all its rounds (round 0 + the re-crawl of
   retryable failures), with politeness on (2 connections and 5 requests/s per host). Reported: wall time of
   each, images obtained, and what the failures cost.
2. Healthy: no failures, ``--hosts`` hosts (10 addresses x N ports; a host is scheme + address + port), runs
   alternating A/B/C/C/B/A (C: clipline with ``hash_images`` off, to separate the cost of hashing in the crawl
   from the cost of politeness). Reported: images/s end to end and over the download phase, CPU of the crawl's
   processes per image, and the CPU per published image of the build's crawl + images + shard stages (clipline, with the
   hashes computed in the crawl) vs plain img2dataset's crawl CPU per image and vs img2dataset + the images stage
   decoding every image again (what the build did before). ``--politeness-off`` adds two variants, clipline with
   politeness off (64 connections a host, no rate limit, no robots.txt) with and without the hashes, to separate
   the costs of the guarded fetch + scheduler + writer, of politeness and of the hashes.

Both variants get the same img2dataset arguments (``pipelines.crawl.engine.img2dataset_kwargs``): same threads,
processes, timeouts, retries, image size and shard size.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ADDRESSES = tuple(f"127.0.0.{i}" for i in range(10, 20))
ALLOW = ("127.0.0.8/29", "127.0.0.16/29")  # the web's hosts; 127.0.0.1 and the private target 127.0.0.2 stay out


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _candidates(pairs: Path, servers: list, out: Path) -> int:
    """The web's pairs as candidates, each URL on one of ``servers`` (by a hash of its path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(pairs)
    bases = [s.base_url for s in servers]
    urls = [bases[int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % len(bases)] + p
            for p in t.column("path").to_pylist()]
    uids = [hashlib.sha256(f"{u}\x00{c}".encode()).hexdigest()[:32]
            for u, c in zip(urls, t.column("caption").to_pylist())]
    n = t.num_rows
    cand = pa.table({"uid": uids, "url": urls, "caption": t.column("caption"),
                     "entry_ids": pa.array([[1, 2]] * n, pa.list_(pa.int32())), "lang": t.column("lang"),
                     "lang_score": pa.array([1.0] * n, pa.float32()), "keep_prob": pa.array([1.0] * n)})
    pq.write_table(cand.sort_by("uid"), out)  # clipline sorts by uid too: both crawl the same order
    return n


def _serve(web: Path, n_hosts: int, **kw) -> list:
    from pipelines.synthweb import SynthWebServer

    servers = []
    for i in range(n_hosts):
        addr = ADDRESSES[i % len(ADDRESSES)]
        srv = SynthWebServer(web, host=addr, private_host="127.0.0.2" if i == 0 else None,
                             poll_interval=0.5, **kw)
        servers.append(srv.start())
    return servers


def _stop(servers) -> None:
    for s in servers:
        s.stop()


def _img2dataset_stats(out: Path) -> dict:
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    return {"successes": sum(s["successes"] for s in stats),
            "download_s": max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)}


def _plain(config, cand: Path, out: Path) -> dict:
    """Plain img2dataset, one pass, its own chatter silenced (it prints to this process's stdout)."""
    import contextlib

    from img2dataset import download

    from pipelines.crawl.driver import CARRIED_COLUMNS
    from pipelines.crawl.engine import img2dataset_kwargs

    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        download(**img2dataset_kwargs(config, url_list=str(cand), output_folder=str(out),
                                      additional_columns=CARRIED_COLUMNS))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "worker_cpu_s": _children_cpu() - cpu0, **_img2dataset_stats(out)}


def _clipline(config, cand: Path, out: Path, staging: Path) -> dict:
    from pipelines.crawl import crawl_all, crawl_outcome, host_report

    cpu0, t0 = _children_cpu(), time.perf_counter()
    rounds = crawl_all(cand, str(out), config.replace(staging_dir=str(staging)), log_file=str(staging / "log"))
    wall = time.perf_counter() - t0
    outcome = crawl_outcome(str(out))
    report = host_report(str(out))
    r0 = report["rounds"][0]
    # The image helper processes are children of the crawl's workers, not of this process, and are not waited
    # for: their CPU is what they reported, from the shards' stats.
    # The round's shared helpers are this process's children, reaped at the round's end: they are in
    # _children_cpu() (shared_helper_cpu_s, their CPU on the images, is the part of it they reported).
    helper_cpu = sum(r.get("helper_cpu_s", 0.0) for r in report["rounds"])
    return {"wall_s": wall, "worker_cpu_s": _children_cpu() - cpu0 + helper_cpu, "helper_cpu_s": helper_cpu,
            "shared_helper_cpu_s": sum(r.get("shared_helper_cpu_s", 0.0) for r in report["rounds"]),
            "processed_in_thread": sum(r.get("processed_in_thread", 0) for r in report["rounds"]),
            "successes": outcome.successes.num_rows,
            "download_s": r0["download_seconds"], "rounds": report["rounds"],
            "round_urls": [r.n_rows for r in rounds], "failures": dict(outcome.reasons),
            "host_totals": report["totals"]}


# ----------------------------------------------------------------------------------------------------- hostile


def hostile(work: Path, n_urls: int, config) -> dict:
    import pyarrow.parquet as pq

    from pipelines.synthweb import generate_web

    web = work / "hostile-web"
    # A hostile web: every failure kind at 2% (about 28% of URLs misbehave), stalls and drips of 60 s.
    generate_web(web, n_urls, seed=1, failure_rate=0.02, heldout_per_class=1)
    servers = _serve(web, len(ADDRESSES), stall_seconds=60, drip_seconds=60, drip_interval=0.5)
    try:
        cand = work / "hostile-candidates.parquet"
        _candidates(servers[0].materialise_url_list()["parquet"], servers, cand)
        modes = pq.read_table(web / "raw" / "pairs.parquet", columns=["failure_mode"]).column("failure_mode")
        mode_counts = {m: modes.to_pylist().count(m) for m in sorted(set(modes.to_pylist()))}
        print(f"hostile web: {n_urls} URLs on {len(servers)} hosts; failure modes {mode_counts}", flush=True)
        plain = _plain(config, cand, work / "hostile-img2dataset")
        print(f"  img2dataset one pass: {plain['wall_s']:.1f} s, {plain['successes']} images", flush=True)
        ours = _clipline(config, cand, work / "hostile-clipline", work / "staging-hostile")
        print(f"  clipline all rounds:  {ours['wall_s']:.1f} s, {ours['successes']} images "
              f"(rounds {ours['round_urls']})", flush=True)
        private_hits = sum(servers[0].private_hits.values())
    finally:
        _stop(servers)
    return {"n_urls": n_urls, "failure_modes": mode_counts, "img2dataset": plain, "clipline": ours,
            "private_hits_total": private_hits, "ratio_wall": ours["wall_s"] / plain["wall_s"]}


# ----------------------------------------------------------------------------------------------------- healthy


def _build_cpu(crawl_dir: Path, work: Path, name: str) -> dict:
    """CPU of the images stage and the shard stage (both in this process) on a crawl directory."""
    import pyarrow as pa

    from pipelines.core import storage
    from pipelines.images.stage import ImagesConfig, process_images
    from pipelines.images.stage import read_rows
    from pipelines.shard.writer import ShardConfig, ShardStage

    pool = work / f"pool-{name}"
    cpu0, t0 = _self_cpu(), time.perf_counter()
    result = process_images(str(crawl_dir), str(pool), ImagesConfig(), rejected_uri=str(work / f"rej-{name}.parquet"))
    images_cpu, images_wall = _self_cpu() - cpu0, time.perf_counter() - t0
    files = sorted(str(p) for p in pool.glob("samples-*.parquet"))
    ok = sorted(r["uid"] for r in read_rows(files, columns=["uid", "status"]) if r["status"] == "ok")
    kept = str(work / f"kept-{name}.parquet")
    storage.write_table(kept, pa.table({"uid": pa.array(ok, pa.string())}))
    cpu0, t0 = _self_cpu(), time.perf_counter()
    ShardStage(ShardConfig(samples_per_shard=1000), {"pool": str(pool), "kept": kept},
               str(work / f"shards-{name}")).run()
    shard_cpu, shard_wall = _self_cpu() - cpu0, time.perf_counter() - t0
    return {"images_cpu_s": images_cpu, "images_wall_s": images_wall, "shard_cpu_s": shard_cpu,
            "shard_wall_s": shard_wall, "published": len(ok), "pool_kept": result.kept}


NO_POLITENESS = {"per_host_connections": 64, "per_host_rps": None, "respect_robots": False}


def healthy(work: Path, n_urls: int, n_hosts: int, repeats: int, config, politeness_off: bool = False,
            in_thread: bool = False, sides: tuple[int, int] = (96, 192), cache: Path | None = None,
            private_helpers: bool = False, backgrounds: str = "room") -> dict:
    from pipelines.synthweb import generate_web

    web = (cache or work) / f"healthy-web-{n_urls}-{sides[0]}-{sides[1]}-{backgrounds}"  # a complete web is reused
    generate_web(web, n_urls, seed=0, failure_rate=0.0, min_per_failure_mode=0, heldout_per_class=1,
                 min_side=sides[0], max_side=sides[1], backgrounds=backgrounds)
    servers = _serve(web, n_hosts)
    variants = ["img2dataset", "clipline", "clipline_nohash"] + (
        ["clipline_nopolite", "clipline_nohash_nopolite"] if politeness_off else []) + (
        ["clipline_inthread"] if in_thread else []) + (["clipline_private"] if private_helpers else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    order_log = []
    build = {}
    try:
        cand = work / "healthy-candidates.parquet"
        _candidates(servers[0].materialise_url_list()["parquet"], servers, cand)
        print(f"healthy web: {n_urls} URLs on {n_hosts} hosts", flush=True)
        order: list[str] = []
        for i in range(repeats):  # A/B/C, then C/B/A, ...: drift in the machine's load hits all alike
            order += variants if i % 2 == 0 else variants[::-1]
        for k, name in enumerate(order):
            out = work / f"healthy-{name}-{k}"
            if name == "img2dataset":
                r = _plain(config, cand, out)
            else:
                cfg = config.replace(hash_images="nohash" not in name,
                                     image_processes=0 if name.endswith("inthread") else config.image_processes,
                                     shared_image_helpers=not name.endswith("private"),
                                     **(NO_POLITENESS if name.endswith("nopolite") else {}))
                r = _clipline(cfg, cand, out, work / f"staging-{k}")
            runs[name].append(r)
            order_log.append({"variant": name, **{x: r[x] for x in ("wall_s", "download_s", "worker_cpu_s",
                                                                      "successes", "helper_cpu_s",
                                                                      "shared_helper_cpu_s",
                                                                      "processed_in_thread") if x in r}})
            print(f"  [{k + 1}/{len(order)}] {name:12s} {r['successes']} images  wall {r['wall_s']:6.2f} s  "
                  f"download {r['download_s']:6.2f} s  worker CPU {r['worker_cpu_s']:6.2f} s", flush=True)
            if name not in build and name in ("img2dataset", "clipline"):  # the first crawl of each, for the build CPU
                build[name] = out
            else:
                shutil.rmtree(out)
    finally:
        _stop(servers)
    build_cpu = {name: _build_cpu(out, work, name) for name, out in build.items()}

    def med(name, f):
        return statistics.median(f(r) for r in runs[name])

    summary = {}
    for name in runs:
        summary[name] = {
            "images": runs[name][0]["successes"],
            "wall_img_s": med(name, lambda r: r["successes"] / r["wall_s"]),
            "download_img_s": med(name, lambda r: r["successes"] / r["download_s"]),
            "cpu_ms_per_img": med(name, lambda r: 1000 * r["worker_cpu_s"] / r["successes"]),
        }
    base, ours = summary["img2dataset"], summary["clipline"]
    crawl_cpu = {n: statistics.median(r["worker_cpu_s"] for r in runs[n]) for n in runs}
    per_img = {}
    for n in build_cpu:
        b = build_cpu[n]
        per_img[n] = 1000 * (crawl_cpu[n] + b["images_cpu_s"] + b["shard_cpu_s"]) / b["published"]
    return {
        "n_urls": n_urls, "n_hosts": n_hosts, "repeats": repeats, "image_sides": list(sides),
        "backgrounds": backgrounds, "summary": summary,
        "order": order_log,
        "overhead_wall_pct": 100 * (base["wall_img_s"] / ours["wall_img_s"] - 1),
        "overhead_download_pct": 100 * (base["download_img_s"] / ours["download_img_s"] - 1),
        "overhead_crawl_cpu_pct": 100 * (ours["cpu_ms_per_img"] / base["cpu_ms_per_img"] - 1),
        "overhead_nohash_download_pct": 100 * (base["download_img_s"] / summary["clipline_nohash"]["download_img_s"]
                                               - 1),
        "overhead_nohash_wall_pct": 100 * (base["wall_img_s"] / summary["clipline_nohash"]["wall_img_s"] - 1),
        "overhead_download_pct_by_variant": {n: 100 * (base["download_img_s"] / summary[n]["download_img_s"] - 1)
                                             for n in summary if n != "img2dataset"},
        "build_cpu": build_cpu, "build_cpu_ms_per_published_image": per_img,
        "build_vs_plain_crawl_cpu": per_img["clipline"] / base["cpu_ms_per_img"],
        # The same build CPU per *crawled* image (both figures divided by the images both crawls downloaded): the
        # published count is lower by the web's duplicates, which the images stage drops (on the flat-background
        # web, ~40 % of the pictures are pHash near-duplicates of another; on the "room" web, its declared ~6 %).
        "build_vs_plain_crawl_cpu_per_crawled": (1000 * (crawl_cpu["clipline"] + build_cpu["clipline"]["images_cpu_s"]
                                                         + build_cpu["clipline"]["shard_cpu_s"])
                                                 / summary["clipline"]["images"]) / base["cpu_ms_per_img"],
        "build_vs_old_build_cpu": per_img["clipline"] / per_img["img2dataset"],
    }


def run(args) -> dict:
    from pipelines.crawl import CrawlConfig

    config = CrawlConfig(allow_cidrs=ALLOW, processes=args.processes, thread_count=args.threads,
                         number_sample_per_shard=args.shard, image_size=128, retries=1, timeout=10,
                         max_download_seconds=10, recrawl_rounds=1, image_processes=args.image_processes)
    work = Path(tempfile.mkdtemp(prefix="crawl_bench_"))
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "config": {k: v for k, v in config.to_dict().items()
                         if k in ("processes", "thread_count", "image_processes", "shared_image_helpers", "number_sample_per_shard", "image_size", "retries",
                                  "timeout", "max_download_seconds", "per_host_connections", "per_host_rps",
                                  "host_failure_limit", "recrawl_rounds")}}
    report["config"]["image_processes_resolved"] = config.image_processes_per_process()
    try:
        if args.hostile_urls:
            report["hostile"] = hostile(work, args.hostile_urls, config)
        if args.healthy_urls:
            report["healthy"] = healthy(work, args.healthy_urls, args.hosts, args.repeats, config,
                                        args.politeness_off, args.in_thread,
                                        tuple(int(x) for x in args.sides.split(",")),
                                        Path(args.web_cache) if args.web_cache else None, args.private_helpers,
                                        args.backgrounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hostile-urls", type=int, default=400)
    ap.add_argument("--healthy-urls", type=int, default=3000)
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shard", type=int, default=1000)
    ap.add_argument("--json", type=str, default=None, help="also write the raw report here")
    ap.add_argument("--politeness-off", action="store_true",
                    help="also run clipline with politeness off, with and without hashes (separates the costs)")
    ap.add_argument("--sides", default="96,192",
                    help="MIN,MAX side in pixels of the healthy web's images (the synthetic web's default: 96,192; "
                         "web photos are larger, e.g. 320,1024)")
    ap.add_argument("--image-processes", type=int, default=None,
                    help="clipline's image helper processes per crawl process (crawl.image_processes; default: "
                         "the crawl's default, cores / processes, 1..4)")
    ap.add_argument("--backgrounds", choices=("room", "flat"), default="room",
                    help="the healthy web's pictures on a shaded room each (distinct to pHash, like photos) or on a "
                         "flat tint (stop 18 and before: ~40%% of them pHash near-duplicates of another)")
    ap.add_argument("--web-cache", default=None, help="keep the generated healthy webs here between runs")
    ap.add_argument("--in-thread", action="store_true",
                    help="also run clipline with image_processes 0 (resize and hashes in the download threads)")
    ap.add_argument("--private-helpers", action="store_true",
                    help="also run clipline with shared_image_helpers false (each crawl process starts its own "
                         "helpers, again with each img2dataset worker process)")
    args = ap.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":  # required: img2dataset's workers are spawned and re-import this module
    sys.exit(main())
