"""Reading a large crawl's outcome: the code of this checkout vs the code of an earlier commit, same crawl directory,
same run.

    .venv/bin/python benchmarks/crawl_outcome_bench.py [--rows 1000000] [--shard-rows 10000] [--recrawled 0.1]
                                                     [--baseline 226c54b] [--repeats 2] [--json OUT]

Writes a crawl directory by hand (no download): round 0 with ``--rows`` candidates in shards of ``--shard-rows``
(img2dataset's columns plus the ones a clipline crawl adds: hashes, offsets, reasons, timeouts, per-host
figures), 75 % successes, and a re-crawl round 1 of ``--recrawled`` of the rows (a third of them succeed). Then,
each in a fresh subprocess, alternating baseline / current (A/B/B/A...):

- ``outcome``: ``crawl_outcome`` + ``.rejected`` (the two whole tables);
- ``rejected_table``: what the crawl stage does after its last round: its rejected table written (baseline: from
  the whole outcome; now: part by part of ``iter_outcomes``, as ``CrawlStage`` does);
- ``retry``: ``retry_candidates(dir, 2)`` (what the re-crawl round does before it starts);
- ``final_outcomes``: the images stage's map of re-crawled uids (pipelines.images.crawl_reader);
- ``spread_hosts``: the order of round 0's URL list (each host's URLs spread over the list), as the crawl computes
  it before it starts (baseline: ``politeness.spread_hosts`` on the URLs as a Python list).

Reported per step: wall seconds and the subprocess's peak resident memory above its RSS when the step starts
(sampled every 5 ms), the medians of ``--repeats``. The baseline's modules are read with ``git show BASELINE:path`` and loaded in place of
this checkout's (results.py, crawl.py's retry_candidates, crawl_reader.py, politeness.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODULES = {"politeness": "pipelines/crawl/politeness.py", "results": "pipelines/crawl/results.py",
           "crawl": "pipelines/crawl/driver.py", "crawl_reader": "pipelines/images/crawl_reader.py"}
RENAMED = {"pipelines/crawl/driver.py": "pipelines/crawl/crawl.py"}
STEPS = ("outcome", "rejected_table", "retry", "final_outcomes", "spread_hosts")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


class _PeakRss:
    """The process's largest resident set while the block runs (sampled every 5 ms), in MiB."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def write_crawl(crawl_dir: Path, rows: int, shard_rows: int, recrawled: float, seed: int = 0) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.crawl import CrawlConfig
    from pipelines.crawl.rounds import meta_uri, round_dir

    rng = np.random.default_rng(seed)
    uids = np.array([f"{x:032x}" for x in rng.integers(0, 2 ** 62, rows)], dtype=object)
    urls = np.array([f"http://host{i % 5000}.example/img/{u}.jpg" for i, u in enumerate(uids)], dtype=object)
    ok = rng.random(rows) < 0.75
    errors = np.array(["HTTP Error 404: Not Found", "timed out", "HTTP Error 503: Service Unavailable",
                       "<urlopen error [Errno 111] Connection refused>", "image decoding error"], dtype=object)

    def shard_table(idx, round_no, success, offset):
        n = len(idx)
        return pa.table({
            "key": [f"{round_no}{offset + j:08d}" for j in range(n)],
            "uid": uids[idx].tolist(),
            "url": urls[idx].tolist(),
            "caption": [f"a photo of thing {i}" for i in idx],
            "entry_ids": pa.array([[int(i % 500000), 7] for i in idx], pa.list_(pa.int32())),
            "status": pa.array(np.where(success, "success", "failed_to_download")),
            "error_message": pa.array([None if x else errors[i % len(errors)] for i, x in zip(idx, success)],
                                      pa.string()),
            "width": pa.array([256 if x else None for x in success], pa.int64()),
            "height": pa.array([256 if x else None for x in success], pa.int64()),
            "original_width": pa.array([640 if x else None for x in success], pa.int64()),
            "original_height": pa.array([480 if x else None for x in success], pa.int64()),
            "sha256": pa.array([None] * n, pa.string()),
            "img_sha256": pa.array([f"{i:064x}" if x else None for i, x in zip(idx, success)], pa.string()),
            "img_width": pa.array([256 if x else None for x in success], pa.int32()),
            "img_height": pa.array([256 if x else None for x in success], pa.int32()),
            "img_error": pa.array([None] * n, pa.string()),
            "phash": pa.array([int(i) * 2654435761 % 2 ** 64 if x else None for i, x in zip(idx, success)],
                              pa.uint64()),
            "dhash": pa.array([int(i) * 40503 % 2 ** 64 if x else None for i, x in zip(idx, success)], pa.uint64()),
            "jpg_offset": pa.array([512 * (j + 1) if x else None for j, x in enumerate(success)], pa.int64()),
            "jpg_size": pa.array([9000 if x else None for x in success], pa.int64()),
            "reason": pa.array([None] * n, pa.string()),
            "timeouts": pa.array([0] * n, pa.int32()),
            "fetch_seconds": pa.array(rng.random(n).astype("float32")),
            "attempts": pa.array([1] * n, pa.int32()),
            "host": pa.array([u.split("/")[2] for u in urls[idx]]),
        })

    def write_round(round_no, idx, success):
        out = Path(round_dir(str(crawl_dir), round_no))
        out.mkdir(parents=True, exist_ok=True)
        (crawl_dir / "_clipline").mkdir(exist_ok=True)
        pq.write_table(pa.table({"url": urls[idx].tolist(), "caption": [f"a photo of thing {i}" for i in idx],
                                 "uid": uids[idx].tolist(),
                                 "entry_ids": pa.array([[int(i % 500000), 7] for i in idx], pa.list_(pa.int32()))}),
                       meta_uri(str(crawl_dir), round_no, "input.parquet"))
        with open(meta_uri(str(crawl_dir), round_no, "config.json"), "w") as f:
            json.dump(CrawlConfig(number_sample_per_shard=shard_rows).to_dict(), f)
        for k, start in enumerate(range(0, len(idx), shard_rows)):
            part = idx[start:start + shard_rows]
            pq.write_table(shard_table(part, round_no, success[start:start + shard_rows], start),
                           out / f"{k:05d}.parquet")
            (out / f"{k:05d}.tar").touch()
            (out / f"{k:05d}_stats.json").write_text(json.dumps({"successes": int(success[start:start + shard_rows].sum())}))

    all_idx = np.arange(rows)
    write_round(0, all_idx, ok)
    failed = all_idx[~ok]
    again = np.sort(rng.choice(failed, size=min(len(failed), int(rows * recrawled)), replace=False))
    write_round(1, again, rng.random(len(again)) < 1 / 3)
    return {"rows": rows, "shards_round0": -(-rows // shard_rows), "recrawled": len(again)}


def _load_baseline(rev: str, dest: Path) -> None:
    """The baseline's three modules as files in ``dest`` (imported in place of this checkout's)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, path in MODULES.items():
        for p in (path, RENAMED.get(path)):  # a baseline from before a module's rename has it under its old name
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{p}"], capture_output=True, text=True,
                                   check=False)
            if shown.returncode == 0 or p is None:
                break
        shown.check_returncode()
        text = shown.stdout
        (dest / f"{name}.py").write_text(text)


def child(args) -> None:
    """One measured step in this (fresh) process; prints a JSON line."""
    import importlib.util

    import pyarrow.parquet as pq

    import pipelines.crawl.driver
    import pipelines.images.crawl_reader  # imports done before the step's RSS is read

    mods = {}
    current = {"results": sys.modules["pipelines.crawl.results"], "crawl": sys.modules["pipelines.crawl.driver"],
               "crawl_reader": pipelines.images.crawl_reader,
               "politeness": sys.modules["pipelines.crawl.host_order"]}
    for name in MODULES:
        if args.code_dir:
            spec = importlib.util.spec_from_file_location(f"baseline_{name}", Path(args.code_dir) / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            if name == "politeness":  # the baseline's crawl.py imports its spread_hosts from there
                sys.modules["pipelines.crawl.politeness"].spread_hosts = mod.spread_hosts
        else:
            mod = current[name]
        mods[name] = mod
    if args.code_dir:  # the baseline's retry_candidates reads the baseline's outcome
        mods["crawl"].crawl_outcome = mods["results"].crawl_outcome
    base_rss = _rss_mib()
    t0 = time.perf_counter()
    with _PeakRss() as peak:
        if args.step == "outcome":
            out = mods["results"].crawl_outcome(args.crawl_dir)
            n = out.rejected.num_rows + out.successes.num_rows
        elif args.step == "rejected_table":  # what the crawl stage writes after its last round
            import pyarrow.parquet as pq_

            from pipelines.core import storage
            target = os.path.join(args.crawl_dir, "..", f"rejected-{os.getpid()}.parquet")
            if args.code_dir or not hasattr(mods["results"], "iter_outcomes"):
                out = mods["results"].crawl_outcome(args.crawl_dir)
                storage.write_table(target, out.rejected)
                n = out.n_candidates
            else:
                n = 0
                from schemas import rejected as rejected_schema
                with pq_.ParquetWriter(target, rejected_schema.SCHEMA, compression="zstd") as writer:
                    for part in mods["results"].iter_outcomes(args.crawl_dir):
                        writer.write_table(part.rejected)
                        n += part.n_candidates
            os.unlink(target)
        elif args.step == "spread_hosts":  # the order of round 0's URL list, as _url_list computes it
            from pipelines.crawl.rounds import list_rounds
            urls = pq.read_table(list_rounds(args.crawl_dir)[0].input_path, columns=["url"]).column("url")
            n = len(mods["politeness"].spread_hosts(urls.to_pylist() if args.code_dir else urls))
        elif args.step == "retry":
            n = mods["crawl"].retry_candidates(args.crawl_dir, 2).num_rows
        else:
            listed = mods["crawl_reader"].crawl_shards(args.crawl_dir)
            fn = mods["crawl_reader"].final_outcomes
            if args.code_dir:
                n = len(fn(listed))
            else:
                from pipelines.crawl.rounds import crawl_shard_files
                n = len(fn(listed, [r for r, _p, _t in crawl_shard_files(args.crawl_dir)]))
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "peak_rss_over_start_mib": peak.peak - base_rss, "rows_out": n}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--recrawled", type=float, default=0.1)
    ap.add_argument("--baseline", default="226c54b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--crawl-dir", help=argparse.SUPPRESS)
    ap.add_argument("--code-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="outcome-bench-"))
    try:
        crawl_dir = work / "crawl"
        t0 = time.perf_counter()
        made = write_crawl(crawl_dir, args.rows, args.shard_rows, args.recrawled)
        print(f"crawl directory: {made} (written in {time.perf_counter() - t0:.1f} s)", flush=True)
        _load_baseline(args.baseline, work / "baseline")
        runs: dict[tuple[str, str], list[dict]] = {}
        for step in args.steps.split(","):
            for i in range(args.repeats):
                for variant in (("baseline", "current") if i % 2 == 0 else ("current", "baseline")):
                    cmd = [sys.executable, __file__, "--child", "--step", step, "--crawl-dir", str(crawl_dir)]
                    if variant == "baseline":
                        cmd += ["--code-dir", str(work / "baseline")]
                    res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    runs.setdefault((step, variant), []).append(r)
                    print(f"  {step:15s} {variant:8s} {r['wall_s']:7.2f} s  peak +{r['peak_rss_over_start_mib']:7.0f} MiB"
                          f"  rows {r['rows_out']}", flush=True)
        summary = {}
        for (step, variant), rs in runs.items():
            summary.setdefault(step, {})[variant] = {
                "wall_s": statistics.median(r["wall_s"] for r in rs),
                "peak_rss_over_start_mib": statistics.median(r["peak_rss_over_start_mib"] for r in rs),
                "rows_out": rs[0]["rows_out"]}
        for step, v in summary.items():
            assert v["baseline"]["rows_out"] == v["current"]["rows_out"], (step, v)
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "baseline": args.baseline,
                  "crawl": made, "shard_rows": args.shard_rows, "repeats": args.repeats, "summary": summary}
        print(json.dumps(summary, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
