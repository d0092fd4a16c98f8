"""Benchmark: multi-index Hamming search of 1,000,000 pool hashes against 100,000 evaluation hashes vs a vectorised
brute-force scan (on a subset, same run, extrapolated linearly). Prints a markdown table.

usage: python benchmarks/dedup_search.py [--pool 1000000] [--eval 100000] [--radius R] [--brute-queries 2000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pipelines.decontam.detector import DetectorConfig  # noqa: E402
from pipelines.decontam.mih import MultiIndexHash, brute_force_search  # noqa: E402


def flip_bits(h: np.ndarray, n_bits: np.ndarray, rng) -> np.ndarray:
    out = h.copy()
    for k in range(int(n_bits.max()) + 1):
        sel = n_bits > k
        out[sel] ^= np.uint64(1) << rng.integers(0, 64, sel.sum()).astype(np.uint64)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=1_000_000)
    ap.add_argument("--eval", type=int, default=100_000)
    ap.add_argument("--radius", type=int, default=DetectorConfig().radius)
    ap.add_argument("--brute-queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=None)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    # Eval hashes: groups of correlated variants (as the index holds ~50 variants per image, which share bits).
    base = rng.integers(0, 2**64, a.eval // 50 + 1, dtype=np.uint64)
    eval_h = flip_bits(np.repeat(base, 50)[: a.eval], rng.integers(0, 12, a.eval), rng)
    pool = rng.integers(0, 2**64, a.pool, dtype=np.uint64)
    n_copies = a.pool // 100  # 1% of the pool are near copies of evaluation hashes
    pool[:n_copies] = flip_bits(eval_h[rng.integers(0, a.eval, n_copies)], rng.integers(0, a.radius + 3, n_copies), rng)

    t0 = time.perf_counter()
    mih = MultiIndexHash(eval_h, n_blocks=a.blocks, radius_hint=a.radius)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    qi, ti, d = mih.search(pool, a.radius)
    t_mih = time.perf_counter() - t0

    t0 = time.perf_counter()
    mih_pool = MultiIndexHash(pool, n_blocks=a.blocks, radius_hint=a.radius)
    qi2, ti2, _ = mih_pool.search(eval_h, a.radius)
    t_mih_rev = time.perf_counter() - t0

    nb = a.brute_queries
    t0 = time.perf_counter()
    bq, bt, bd = brute_force_search(pool[:nb], eval_h, a.radius)
    t_brute_sub = time.perf_counter() - t0
    t_brute = t_brute_sub * a.pool / nb
    sub = qi < nb
    same = np.array_equal(np.sort(bq * a.eval + bt), np.sort(qi[sub] * a.eval + ti[sub]))
    assert same, "MIH and brute force disagree on the subset"
    assert len(qi) == len(qi2), "MIH in both directions must find the same pairs"
    print(f"| pool hashes | eval hashes | radius | blocks | pairs found | MIH build | MIH search (pool->eval index) "
          f"| MIH (eval->pool index, incl. build) | brute force ({nb} queries) | brute force, extrapolated | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.pool:,} | {a.eval:,} | {a.radius} | {mih.n_blocks} | {len(qi):,} | {t_build:.2f} s | {t_mih:.1f} s | "
          f"{t_mih_rev:.1f} s | {t_brute_sub:.2f} s | {t_brute:.0f} s | {t_brute / (t_build + t_mih):.0f}x |")


if __name__ == "__main__":
    main()
