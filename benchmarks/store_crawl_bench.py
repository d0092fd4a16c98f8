"""A dataset version's crawl stage over a large crawl store: the code of this checkout vs an earlier commit, same
store, same candidates, same run.

    .venv/bin/python benchmarks/store_crawl_bench.py [--urls 1000000] [--shared 0.1] [--baseline 264c2b4]
                                                   [--repeats 2] [--json OUT]

Writes by hand (no download) a crawl store of ``--urls`` URLs (80 % stored successes of 64 bytes each in packs of
10,000, 20 % stored failures whose back-off has not expired) and candidates for every URL plus ``--shared`` as many
again that share a URL with another candidate (another caption), and a takedown set (1,000 uids, 1,000 URLs, one
domain of the 5,000 hosts). Then, each in a fresh subprocess on a fresh copy of the store, alternating
baseline / current: ``StoreCrawlStage.compute`` (what a scheduled version build does when every URL is already
stored: takedown deletions, the plan, the crawl directory assembled from the store, the rejected table). Nothing
is downloaded in either; the crawl directory and rejected table must be byte-identical across all runs.

Reported: wall seconds and the subprocess's peak resident memory above its RSS when the step starts, medians of
``--repeats``. The baseline runs from ``git archive BASELINE`` unpacked in a temporary directory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = "2025-03-01T00:00:00Z"


def write_inputs(base: Path, urls: int, shared: float, seed: int = 0) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.crawl.config import CrawlConfig
    from pipelines.dataset import takedown as TD
    from pipelines.dataset.crawl_store import CrawlStore, FetchResult, layout_fingerprint

    rng = np.random.default_rng(seed)
    url_list = [f"http://host{i % 5000}.example/img/{i:09d}.jpg" for i in range(urls)]
    ok = rng.random(urls) < 0.8
    store = CrawlStore.open(str(base / "store"))
    layout = layout_fingerprint(CrawlConfig())
    for start in range(0, urls, 10_000):
        batch = []
        for i in range(start, min(urls, start + 10_000)):
            if ok[i]:
                batch.append(FetchResult(url=url_list[i], status="ok", data=i.to_bytes(8, "big") * 8,
                                         meta={"img_width": 256, "img_height": 256, "phash": i, "dhash": i,
                                               "width": 256, "height": 256, "original_width": 640,
                                               "original_height": 480}))
            else:
                batch.append(FetchResult(url=url_list[i], status="failed", reason="http_404",
                                         error_message="HTTP Error 404: Not Found"))
        store.record(batch, T0, layout)
    n_shared = int(urls * shared)
    cand_urls = url_list + [url_list[int(j)] for j in rng.integers(0, urls, n_shared)]
    n = len(cand_urls)
    uids = [f"{x:032x}" for x in rng.integers(0, 2 ** 62, n)]
    (base / "candidates").mkdir()
    pq.write_table(pa.table({"uid": uids, "url": cand_urls, "caption": [f"a photo of thing {i}" for i in range(n)],
                             "entry_ids": pa.array([[i % 500_000, 7] for i in range(n)], pa.list_(pa.int32())),
                             "lang": ["en"] * n, "lang_score": pa.array([0.99] * n, pa.float32()),
                             "keep_prob": [1.0] * n}), base / "candidates" / "part-00000.parquet")
    tds = base / "takedowns"
    for kind, values in (("uid", [uids[int(j)] for j in rng.integers(0, n, 1000)]),
                         ("url", [url_list[int(j)] for j in rng.integers(0, urls, 1000)]),
                         ("domain", ["host7.example"])):
        src = base / f"takedown-{kind}.txt"
        src.write_text("\n".join(values) + "\n")
        TD.record(str(tds), kind, str(src))
    return {"urls": urls, "candidates": n, "stored_ok": int(ok.sum()), "stored_failed": int((~ok).sum())}


def child(args) -> None:
    """One measured compute in this (fresh) process, with the code found first on sys.path; prints a JSON line."""
    sys.path.insert(0, args.code_root)
    from pipelines.crawl.config import CrawlConfig
    from pipelines.dataset.store_crawl import StoreCrawlStage

    sys.path.insert(1, str(Path(__file__).resolve().parent))
    from crawl_outcome_bench import _PeakRss, _rss_mib  # (puts this checkout on sys.path: imported last)

    assert Path(sys.modules["pipelines"].__file__).resolve().is_relative_to(Path(args.code_root).resolve())
    base = Path(args.work)
    stage = StoreCrawlStage(CrawlConfig(), {"candidates": str(base / "candidates")}, str(base / "crawl"),
                            store=str(base / "store"), as_of=T0, takedowns=str(base / "takedowns"),
                            fetch_dir=str(base / "fetch"))
    base_rss = _rss_mib()
    t0 = time.perf_counter()
    with _PeakRss() as peak:
        result = stage.compute("fp")
    wall = time.perf_counter() - t0
    digest = hashlib.sha256()
    for f in sorted((base / "crawl").iterdir()) + [base / "rejected" / "crawl.parquet"]:
        digest.update(f.name.encode() + f.read_bytes())
    print(json.dumps({"wall_s": round(wall, 2), "peak_mib": round(peak.peak - base_rss),
                      "kept": result.kept, "rejected": result.rejected, "output_sha256": digest.hexdigest(),
                      "crawl_store": {k: v for k, v in result.details["crawl_store"].items() if k != "uri"}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--urls", type=int, default=1_000_000)
    ap.add_argument("--shared", type=float, default=0.1)
    ap.add_argument("--baseline", default="264c2b4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code-root", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="clipline-store-crawl-bench-") as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(ROOT))
        t0 = time.perf_counter()
        inputs = write_inputs(tmp / "inputs", args.urls, args.shared)
        print(f"inputs: {inputs} in {time.perf_counter() - t0:.1f} s", flush=True)
        code = {"current": str(ROOT), "baseline": str(tmp / "baseline")}
        (tmp / "baseline").mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "pipelines", "schemas"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp / "baseline")], input=archive, check=True)
        runs: dict[str, list[dict]] = {"baseline": [], "current": []}
        order = [("baseline", "current") if k % 2 == 0 else ("current", "baseline") for k in range(args.repeats)]
        for pair in order:
            for name in pair:
                work = tmp / "work"
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(tmp / "inputs", work)
                out = subprocess.run([sys.executable, __file__, "--child", "--code-root", code[name],
                                      "--work", str(work)], capture_output=True, text=True, cwd=tmp)
                if out.returncode:
                    sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(name, runs[name][-1], flush=True)
        summary = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                          "peak_mib": statistics.median(r["peak_mib"] for r in rs)} for name, rs in runs.items()}
        same = len({r["output_sha256"] for rs in runs.values() for r in rs}) == 1
        report = {"inputs": inputs, "baseline": args.baseline, "repeats": args.repeats, "summary": summary,
                  "same_result": same, "runs": runs}
        print(json.dumps(summary), "same result:", same)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
