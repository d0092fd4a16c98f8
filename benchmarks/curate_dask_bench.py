"""Curation on a dask.distributed cluster with 1 and 2 worker processes, against the DirectRunner, in one run.

Input: the rows of the curation benchmark (benchmarks/curate_bench.py: CC3M captions from ../shared/data replicated
to --rows, default 300,000, or generated captions without it; 500,000-entry query list), written as --files Parquet
files in order (the Dask runner makes one bag partition per --dask_npartitions group of input files, so one file
would leave the second worker idle). Measured, per run, each stage run in a fresh driver process:
  direct    Beam's DirectRunner, in_memory, one worker: wall time and CPU of the process
  dask/N    `--runner dask` (pipelines.core.dask_runner) against a scheduler + N worker processes of 1 thread each
            (tests/dask_fixtures.start_dask_cluster, started before the timed part): wall time, CPU of the driver and
            of the whole cluster (scheduler + nanny + worker processes, from psutil)
pairs/s is rows / wall seconds; the 2/1 ratio is wall(1 worker) / wall(2 workers), median over --repeats
interleaved runs. Every Dask output (candidates, rejected rows, entry counts) is compared byte for byte with the
DirectRunner's. The machine may be shared: the load average and the busiest processes are recorded, and on a
machine with other jobs the ratio is an upper-bound-noisy figure (the second worker competes with them for the cores).
Usage:
  python benchmarks/curate_dask_bench.py [--rows 300000] [--files 8] [--repeats 2] [--out docs/curate_dask_bench.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from curate_bench import finish, load_snapshot, make_inputs, output_digest, run_stage  # noqa: E402


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes and all their descendants, alive ones only."""
    import psutil

    total, seen = 0.0, set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    return total


def run_dask(n_workers: int, inp: dict, out: Path, params: dict, npartitions: int, log_dir: Path) -> dict:
    from tests.dask_fixtures import start_dask_cluster, stop_dask_cluster

    address, procs = start_dask_cluster(n_workers, log_dir=log_dir)
    try:
        time.sleep(2)  # let the workers finish starting up before the clock runs
        cpu0 = _tree_cpu([p.pid for p in procs])
        t0 = time.perf_counter()
        r = run_stage(ROOT, inp["raw"], inp["querylist"], out, params, runner="dask",
                      beam_args=[f"--dask_client_address={address}", f"--dask_npartitions={npartitions}"])
        r["outer_wall_s"] = time.perf_counter() - t0
        r["cluster_cpu_s"] = _tree_cpu([p.pid for p in procs]) - cpu0
    finally:
        stop_dask_cluster(procs)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--files", type=int, default=8, help="input files (the rows split in order)")
    ap.add_argument("--npartitions", type=int, default=0, help="--dask_npartitions (default: --files)")
    ap.add_argument("--workers", default="1,2", help="worker-process counts to measure")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dedup", default="url", choices=["url", "url_caption", "none"])
    ap.add_argument("--keep", action="store_true", help="keep the work directory (inputs, outputs, dask logs)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "curate_dask_bench.json"))
    args = ap.parse_args(argv)
    workers = [int(x) for x in args.workers.split(",")]
    npart = args.npartitions or args.files

    work = Path(tempfile.mkdtemp(prefix="curate_dask_bench_"))
    inp = make_inputs(work, args.rows, args.entries, files=args.files)
    params = {"t": 20_000, "dedup": args.dedup}
    print(f"inputs: {args.rows:,} rows ({inp['captions']} captions) in {args.files} files; "
          f"{len(inp['ql']):,} entries; work dir {work}")
    runs: dict = {"direct": [], **{f"dask/{n}": [] for n in workers}}
    identical: dict = {}
    snapshots = [load_snapshot()]
    ref = None
    for rep in range(args.repeats):
        r = run_stage(ROOT, inp["raw"], inp["querylist"], work / "direct", params)
        runs["direct"].append(r)
        ref = ref or output_digest(work / "direct")
        print(f"[{rep + 1}] direct  wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:6.1f} s  load {r['load_before']:.1f}")
        for n in workers:
            out = work / f"dask{n}_{rep}"
            r = run_dask(n, inp, out, params, npart, work)
            same = output_digest(out) == ref
            identical.setdefault(f"dask/{n}", []).append(same)
            runs[f"dask/{n}"].append(r)
            print(f"[{rep + 1}] dask/{n}  wall {r['wall_s']:7.1f} s  driver cpu {r['cpu_s']:6.1f} s  cluster cpu "
                  f"{r['cluster_cpu_s']:6.1f} s  load {r['load_before']:.1f}  identical to direct: {same}")
        snapshots.append(load_snapshot())

    def summary(rs):
        wall = statistics.median(r["wall_s"] for r in rs)
        out = {"wall_s": [round(r["wall_s"], 2) for r in rs], "wall_s_median": round(wall, 2),
               "pairs_per_s": round(args.rows / wall), "driver_cpu_s": [round(r["cpu_s"], 2) for r in rs],
               "load_1min": [round(r["load_before"], 2) for r in rs], "kept": rs[0]["kept"]}
        if "cluster_cpu_s" in rs[0]:
            out["cluster_cpu_s"] = [round(r["cluster_cpu_s"], 2) for r in rs]
            out["cpu_s_per_pair_total_us"] = round(1e6 * statistics.median(
                r["cluster_cpu_s"] + r["cpu_s"] for r in rs) / args.rows, 2)
        return out

    result = {"rows": args.rows, "files": args.files, "dask_npartitions": npart, "captions": inp["captions"],
              "entries": len(inp["ql"]), "params": params, "repeats": args.repeats,
              "runs": {k: summary(v) for k, v in runs.items()},
              "outputs_identical_to_direct": {k: all(v) for k, v in identical.items()},
              "machine": snapshots}
    if 1 in workers and 2 in workers:
        w1, w2 = result["runs"]["dask/1"]["wall_s_median"], result["runs"]["dask/2"]["wall_s_median"]
        result["ratio_2_over_1_workers"] = round(w1 / w2, 3)
        result["ratio_per_repeat"] = [round(a["wall_s"] / b["wall_s"], 3)
                                      for a, b in zip(runs["dask/1"], runs["dask/2"])]
    finish(result, args, work, hide="machine")


if __name__ == "__main__":
    main()
