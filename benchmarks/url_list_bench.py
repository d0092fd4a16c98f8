"""Memory of a round's URL list: built whole vs in parts (pipelines.crawl.url_lists), and img2dataset's Reader over
the list as one file vs files of whole shards.

    .venv/bin/python benchmarks/url_list_bench.py [--rows 2000000] [--part-rows 250000] [--json out.json]

Writes ``--rows`` synthetic candidates (URLs on a Zipf spread of 5,000 hosts, captions of 40-120 characters) in 8
files, then runs each variant in its own fresh process, one after the other, alternating, and reports the
process's CPU seconds, wall seconds and peak RSS (VmHWM):

- ``whole``: what round 0 did for any number of candidates before: every file read, sorted by uid, duplicate uids
  checked, hosts spread, written (``driver._url_list(read_candidates(files))``);
- ``parted``: :func:`pipelines.crawl.url_lists.write_parted` with ``--part-rows``;
- ``reader_whole`` / ``reader_parted``: img2dataset's Reader cutting the written list into shard files, given the
  list as one file, or as files of whole shards (:func:`pipelines.crawl.url_lists.split_for_reader`, included).

Both lists are checked to hold the same rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD = 10_000


def make_candidates(out: Path, rows: int, files: int = 8) -> list[str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                        ("entry_ids", pa.list_(pa.int32())), ("lang", pa.string()), ("lang_score", pa.float32()),
                        ("keep_prob", pa.float64())])
    rng = np.random.default_rng(0)
    paths = []
    per = -(-rows // files)
    words = np.array("a photo of the small red dog on green grass near an old house in winter light".split())
    for k in range(files):
        n = min(per, rows - k * per)
        hosts = rng.zipf(1.3, n) % 5000
        ids = np.arange(k * per, k * per + n)
        urls = [f"https://img{h}.example.org/media/{i:010d}/{i * 7919 % 100003}.jpg" for h, i in zip(hosts, ids)]
        lens = rng.integers(6, 20, n)
        caps = [" ".join(words[rng.integers(0, len(words), m)]) for m in lens]
        uids = [hashlib.sha256(u.encode()).hexdigest()[:32] for u in urls]
        t = pa.table({"uid": uids, "url": urls, "caption": caps,
                      "entry_ids": pa.array([[int(i % 97)] for i in ids], pa.list_(pa.int32())),
                      "lang": ["en"] * n, "lang_score": pa.array(np.ones(n), pa.float32()),
                      "keep_prob": np.ones(n)}, schema=schema)
        path = out / f"candidates-{k:02d}.parquet"
        pq.write_table(t, path)
        paths.append(str(path))
    return paths


_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
variant, work, part_rows = sys.argv[2], sys.argv[3], int(sys.argv[4])
files = json.loads(sys.argv[5])
t0 = time.perf_counter()
if variant == "whole":
    from pipelines.core import storage
    from pipelines.crawl.driver import _url_list, read_candidates
    storage.write_table(os.path.join(work, "whole.parquet"), _url_list(read_candidates(files)))
elif variant == "parted":
    from pipelines.crawl.driver import CARRIED_COLUMNS
    from pipelines.crawl import url_lists
    url_lists.write_parted(files, os.path.join(work, "parted.parquet"), ["url", "caption", *CARRIED_COLUMNS],
                           part_rows=part_rows, tmp_dir=work)
else:
    import shutil
    from pipelines.crawl.processes import start_crawl_process
    start_crawl_process()
    from img2dataset.reader import Reader
    from pipelines.crawl import url_lists
    tmp = os.path.join(work, "reader-tmp-" + variant)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    src = os.path.join(work, "parted.parquet")
    if variant == "reader_parted":
        rows = max(1, part_rows // 10000) * 10000
        src = url_lists.split_for_reader(src, os.path.join(work, "reader-parts"), rows)
    extra = ["uid", "entry_ids", "lang", "lang_score", "keep_prob"]
    n = sum(1 for _ in Reader(src, "parquet", "url", "caption", None, None, extra, 10000, set(), tmp))
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(os.path.join(work, "reader-parts"), ignore_errors=True)
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"variant": variant, "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": time.perf_counter() - t0,
                  "peak_rss_mib": hwm / 1024}))
"""


def _run(variant: str, work: str, part_rows: int, files: list[str]) -> dict:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), variant, work, str(part_rows), json.dumps(files)],
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--part-rows", type=int, default=250_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=None, help="directory for the candidates and lists (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        t = time.perf_counter()
        files = make_candidates(Path(work), args.rows)
        size = sum(os.path.getsize(f) for f in files)
        print(f"{args.rows} candidates in {len(files)} files, {size / 2**20:.0f} MiB "
              f"({time.perf_counter() - t:.0f} s to make)", flush=True)
        runs: dict[str, list[dict]] = {}
        order = []
        for i in range(args.repeats):
            pairs = (("whole", "parted"), ("reader_whole", "reader_parted"))
            for a, b in pairs:
                order += [a, b] if i % 2 == 0 else [b, a]
        for v in order:
            r = _run(v, work, args.part_rows, files)
            runs.setdefault(v, []).append(r)
            print(f"{v:14s} cpu {r['cpu_s']:6.1f} s  wall {r['wall_s']:6.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB",
                  flush=True)
        whole = pq.read_table(os.path.join(work, "whole.parquet"))
        parted = pq.read_table(os.path.join(work, "parted.parquet"))
        same_rows = whole.num_rows == parted.num_rows and whole.sort_by("uid").equals(parted.sort_by("uid"))
        print(f"same rows: {same_rows}", flush=True)
    summary = {v: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in ("cpu_s", "wall_s", "peak_rss_mib")}
               for v, rs in runs.items()}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "rows": args.rows, "part_rows": args.part_rows, "candidate_bytes": size, "order": order,
              "runs": runs, "summary_median": summary, "same_rows": same_rows,
              "load_avg_1m_at_end": os.getloadavg()[0]}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if same_rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
