"""Benchmark: multi-index Hamming search of 1,000,000 pool hashes against 100,000 evaluation hashes vs a vectorised
brute-force scan (on a subset of the pool, same run, extrapolated per pair). Prints a markdown table.

Two ways to run the search, both exact (checked against the brute force on the subset):
- streaming: the evaluation hashes are indexed and pool hashes probe them batch by batch (how the detector and the
  Beam step run: the pool arrives as a stream);
- join: both sides are known (an audit of an already hashed pool): the larger side (the pool) is indexed and the
  evaluation hashes probe it (``mih.hamming_join``).

Descriptor mode (``--modes desc``): exact blocked cosine search (:mod:`pipelines.decontam.knn`) with the
detector's whole candidate rule (threshold, margin over the 10th neighbour, high, rank rule) of pool
descriptors against 2 x ``--eval`` evaluation descriptors (each image and its mirror, as the index holds them),
128-d float32, clustered like real ones (groups of look-alikes) with 1% planted near copies. Timed on one core
(``threadpoolctl``) over ``--desc-queries`` pool queries and extrapolated to the whole pool; ``--desc-full``
also runs the whole pool with all cores. Memory: the index, one block of similarities, one batch of queries.

usage: python benchmarks/dedup_search.py [--pool 1000000] [--eval 100000] [--radius R] [--brute-queries 2000]
       [--blocks M] [--modes streaming,join,desc] [--desc-queries 20000] [--desc-full]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pipelines.decontam.detector import DetectorConfig  # noqa: E402
from pipelines.decontam.mih import MultiIndexHash, brute_force_search, choose_blocks, hamming_join  # noqa: E402
from pipelines.decontam import knn  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def desc_bench(n_pool: int, n_eval: int, n_queries: int, full: bool, seed: int, dim: int = 128,
               threshold: float | None = None, topk: int = 5) -> None:
    from threadpoolctl import threadpool_limits

    from pipelines.decontam.descriptor import default_descriptor

    desc = default_descriptor()
    if threshold is None:
        threshold = desc.threshold("candidate")
    t = desc.meta["thresholds"]
    # the detector's whole candidate rule (detector.match_batch): margin over the 10th neighbour unless >= high, and
    # the rank rule (the nearest image's two entries above the floor)
    rule = dict(margin=t["margin"], kth=t["kth"], high=t.get("high"), nearest=2 * int(t.get("nearest", 0)),
                floor=t.get("floor"))
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_eval // 50 + 1, dim)))
    eval_d = unit(np.repeat(centres, 100, axis=0)[: 2 * n_eval] + rng.normal(0, 0.12, (2 * n_eval, dim)))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def pool_batch(n, s):
        r = np.random.default_rng([seed, 0xB00, s])  # not [seed, 0]: that stream equals default_rng(seed), the index's
        x = unit(r.normal(size=(n, dim)))
        k = n // 100
        x[:k] = unit(eval_d[r.integers(0, len(eval_d), k)] + r.normal(0, 0.05, (k, dim)))
        return x

    q = pool_batch(n_queries, 0)
    with threadpool_limits(1):
        t0 = time.perf_counter()
        res = knn.search(q, eval_d, threshold, 2 * topk, **rule)
        t1 = time.perf_counter() - t0
    per_s = n_queries * len(eval_d) / t1
    print(f"descriptor search, 1 core: {n_queries:,} pool x {len(eval_d):,} eval descriptors ({dim}-d, "
          f"threshold {threshold}, rule {rule}, top-{2 * topk} entries): {t1:.2f} s = {per_s / 1e6:.0f} M pairs/s = {n_queries / t1:,.0f} "
          f"pool images/s/core ({len(res.query):,} candidates); {n_pool:,} x {len(eval_d):,}: "
          f"{n_pool * len(eval_d) / per_s:.0f} s on one core")
    mem = eval_d.nbytes + (1 << 22) * 4 + 1024 * dim * 4
    print(f"memory: index {eval_d.nbytes / 2**20:.0f} MiB + similarity block {(1 << 22) * 4 / 2**20:.0f} MiB + "
          f"query batch (1024) {1024 * dim * 4 / 2**20:.1f} MiB = {mem / 2**20:.0f} MiB; peak RSS growth "
          f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024:.0f} MiB")
    if full:
        t0 = time.perf_counter()
        n_found, step = 0, 16384
        for s in range(0, n_pool, step):
            n_found += len(knn.search(pool_batch(min(step, n_pool - s), s + 1), eval_d, threshold, 2 * topk,
                                      **rule).query)
        t = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(f"full run, all cores ({os.cpu_count()}): {n_pool:,} x {len(eval_d):,} in {t:.0f} s wall "
              f"({n_found:,} candidate entries; includes generating the pool vectors); process CPU "
              f"{ru.ru_utime + ru.ru_stime:.0f} s; peak RSS {ru.ru_maxrss / 1024:.0f} MiB")


def flip_bits(h: np.ndarray, n_bits: np.ndarray, rng) -> np.ndarray:
    out = h.copy()
    for k in range(int(n_bits.max()) + 1):
        sel = n_bits > k
        out[sel] ^= np.uint64(1) << rng.integers(0, 64, sel.sum()).astype(np.uint64)
    return out


def brute_per_pair(pool, eval_h, radius, nb) -> tuple[float, tuple]:
    t0 = time.perf_counter()
    res = brute_force_search(pool[:nb], eval_h, radius)
    return (time.perf_counter() - t0) / (nb * len(eval_h)), res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=1_000_000)
    ap.add_argument("--eval", type=int, default=100_000)
    ap.add_argument("--radius", type=int, default=DetectorConfig().radius)
    ap.add_argument("--brute-queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--modes", default="streaming,join")
    ap.add_argument("--desc-queries", type=int, default=20_000)
    ap.add_argument("--desc-full", action="store_true")
    a = ap.parse_args(argv)
    if "desc" in a.modes.split(","):
        desc_bench(a.pool, a.eval, a.desc_queries, a.desc_full, a.seed)
        a.modes = ",".join(m for m in a.modes.split(",") if m != "desc")
        if not a.modes:
            return
    rng = np.random.default_rng(a.seed)
    # Eval hashes: groups of correlated variants (as the index holds ~40 variants per image, which share bits).
    base = rng.integers(0, 2**64, a.eval // 50 + 1, dtype=np.uint64)
    eval_h = flip_bits(np.repeat(base, 50)[: a.eval], rng.integers(0, 12, a.eval), rng)
    pool = rng.integers(0, 2**64, a.pool, dtype=np.uint64)
    n_copies = a.pool // 100  # 1% of the pool are near copies of evaluation hashes
    pool[:n_copies] = flip_bits(eval_h[rng.integers(0, a.eval, n_copies)], rng.integers(0, a.radius + 3, n_copies), rng)
    pool = pool[rng.permutation(a.pool)]

    nb = a.brute_queries
    # Brute force before and after the multi-index runs (the machine is shared: the mean of the two is used).
    per_pair_1, (bq, bt, bd) = brute_per_pair(pool, eval_h, a.radius, nb)
    want = np.sort(bq * a.eval + bt)
    rows = []
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        if mode == "streaming":
            mih = MultiIndexHash(eval_h, n_blocks=a.blocks, radius_hint=a.radius)
            t_build = time.perf_counter() - t0
            pi, ei, d = mih.search(pool, a.radius)
            blocks, radii = mih.n_blocks, mih.block_radii(a.radius)
        elif mode == "join":
            pi, ei, d = hamming_join(pool, eval_h, a.radius, n_blocks=a.blocks)
            t_build = float("nan")  # included in the total
            blocks = a.blocks or choose_blocks(max(a.pool, a.eval), a.radius)
            radii = MultiIndexHash(pool[:1], n_blocks=blocks).block_radii(a.radius)
        else:
            sys.exit(f"unknown mode {mode!r} (streaming, join)")
        t_total = time.perf_counter() - t0
        sub = pi < nb
        assert np.array_equal(np.sort(pi[sub] * a.eval + ei[sub]), want), f"{mode}: MIH != brute force on the subset"
        rows.append((mode, blocks, radii, len(pi), t_build, t_total))
    per_pair_2, _ = brute_per_pair(pool, eval_h, a.radius, nb)
    per_pair = (per_pair_1 + per_pair_2) / 2
    t_brute = per_pair * a.pool * a.eval
    print(f"brute force: {nb} pool queries x {a.eval:,} eval hashes: {per_pair_1 * 1e9:.2f} / {per_pair_2 * 1e9:.2f} "
          f"ns per pair (before / after); extrapolated to {a.pool:,} x {a.eval:,}: {t_brute:.0f} s\n")
    print("| pool hashes | eval hashes | radius | mode | blocks | probe radii | pairs found | index build "
          "| total search time | brute force, extrapolated | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, blocks, radii, n, tb, tt in rows:
        print(f"| {a.pool:,} | {a.eval:,} | {a.radius} | {mode} | {blocks} | {radii} | {n:,} | "
              f"{'incl.' if tb != tb else f'{tb:.2f} s'} | {tt:.1f} s | {t_brute:.0f} s | {t_brute / tt:.0f}x |")


if __name__ == "__main__":
    main()
