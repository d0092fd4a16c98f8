"""Benchmark: connected components of the near-duplicate edges on the one worker that finishes them, before (stop
15: ``beam.combiners.ToList`` of every edge, then a union-find) and now (``transforms.NearComponents``: each bundle
folds its edges into a union-find forest, the compacted forests are merged), same edges, same run.

What the finishing worker holds is simulated as a runner delivers it: edges and accumulators arrive pickled (a
shuffle), so every edge carries its own copies of its two uids. Peak memory by ``tracemalloc`` of that worker's
step (the other workers' folding is measured as CPU), CPU by ``time.process_time``. Both give the same
components (checked). Prints a markdown table.

Graphs of ``--edges`` edges between uids of 32 hex digits (as the pipeline's), split over ``--bundles`` bundles:
"chains": a pool where near copies come in small families (an image and 1-4 near copies); "clusters": large
families (200-1500 uids) whose members are within the radius of many others (edges grow much faster than uids:
a low-entropy image shared by many sites).

usage: python benchmarks/near_components_bench.py [--edges 1000000] [--bundles 16]
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipelines.images import near_dedup  # noqa: E402
from pipelines.images.transforms import NearComponents  # noqa: E402


def graphs(n_edges: int) -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(0)

    def uid() -> str:
        return f"{rng.getrandbits(128):032x}"

    chains: list[tuple[str, str]] = []
    while len(chains) < n_edges:  # families of 2-5 uids (an image and its few near copies), a chain each
        fam = [uid() for _ in range(rng.randrange(2, 6))]
        chains += list(zip(fam, fam[1:]))
    clusters: list[tuple[str, str]] = []
    while len(clusters) < n_edges:  # families of 200-1500 uids, each linked to its next 40 (all within the radius)
        fam = [uid() for _ in range(rng.randrange(200, 1500))]
        clusters += [(a, b) for i, a in enumerate(fam) for b in fam[i + 1:i + 41]]
    return {"chains": chains[:n_edges], "clusters": clusters[:n_edges]}


def shuffled(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def before(edges: list[tuple[str, str]], n_bundles: int) -> tuple[float, float, dict]:
    blobs = [shuffled(edges[k::n_bundles]) for k in range(n_bundles)]
    tracemalloc.start()
    t = time.process_time()
    gathered = []
    for b in blobs:  # ToList: every edge in one list on one worker
        gathered.extend(pickle.loads(b))
    roots = near_dedup.component_roots(gathered)
    cpu = time.process_time() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return cpu, peak, roots


def after(edges: list[tuple[str, str]], n_bundles: int) -> tuple[float, float, float, dict]:
    fn = NearComponents()
    t = time.process_time()
    blobs = []
    for k in range(n_bundles):  # on the workers: fold, compact, send
        acc = fn.create_accumulator()
        for e in pickle.loads(shuffled(edges[k::n_bundles])):
            acc = fn.add_input(acc, e)
        blobs.append(shuffled(fn.compact(acc)))
    fold_cpu = time.process_time() - t
    tracemalloc.start()
    t = time.process_time()
    merged = fn.merge_accumulators(pickle.loads(b) for b in blobs)  # the finishing worker, accumulators streamed
    roots = fn.extract_output(merged)
    cpu = time.process_time() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return fold_cpu, cpu, peak, roots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", type=int, default=1_000_000)
    ap.add_argument("--bundles", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"{args.edges:,} edges, {args.bundles} bundles\n")
    print("| graph | ToList + union-find: peak / CPU | NearComponents merge: peak / CPU | folding on the workers "
          "(CPU, all bundles) | same components |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, edges in graphs(args.edges).items():
        cpu_b, peak_b, roots_b = before(edges, args.bundles)
        fold, cpu_a, peak_a, roots_a = after(edges, args.bundles)
        n_uids = len({u for e in edges for u in e})
        print(f"| {name} ({n_uids:,} uids, {len(roots_b):,} removed) | {peak_b / 2 ** 20:.0f} MiB / {cpu_b:.2f} s | "
              f"{peak_a / 2 ** 20:.0f} MiB / {cpu_a:.2f} s | {fold:.2f} s | {roots_a == roots_b} |", flush=True)
        if roots_a != roots_b:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
