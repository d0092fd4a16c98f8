"""Benchmark: the images stage's near-duplicate edges per bucket (``near_dedup.bucket_pairs``) vs verifying every pair
of a bucket in Python (the code before stop 15, kept here as the baseline), on the same buckets in the same run.
Both give the same connected components (checked). Prints a markdown table.

Cases (pHash radius 4, multi-index buckets as the stage builds them):
- random: distinct random hashes with planted chains of near copies (an ordinary pool);
- shared hash: N uids whose images hash alike (a placeholder image re-encoded by many sites);
- crowded bucket: N distinct hashes agreeing on one block (low-entropy images).

usage: python benchmarks/near_dedup_bench.py [--random 20000] [--shared 4000] [--crowded 3000]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipelines.images import near_dedup  # noqa: E402


def every_verified_pair(block_index: int, members, radius: int) -> list[tuple[str, str]]:
    """The baseline: every pair of the bucket checked by its distance in Python."""
    bounds = near_dedup.block_bounds(radius)
    items = sorted(members)
    out = []
    for i in range(len(items)):
        ua, ha = items[i]
        for j in range(i + 1, len(items)):
            ub, hb = items[j]
            x = int(ha) ^ int(hb)
            if x.bit_count() <= radius and near_dedup._first_zero_block(x, bounds) == block_index:
                out.append((ua, ub) if ua < ub else (ub, ua))
    return out


def cases(n_random: int, n_shared: int, n_crowded: int) -> dict[str, list[tuple[str, int]]]:
    rng = random.Random(0)
    plain = []
    for i in range(n_random):
        h = rng.getrandbits(64)
        plain.append((f"r{i:07d}", h))
        if i % 10 == 0:
            plain.append((f"s{i:07d}", h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64))))
    return {f"random, {len(plain):,} hashes": plain,
            f"shared hash, {n_shared:,} uids": [(f"u{i:07d}", 0xABCDEF0123456789) for i in range(n_shared)],
            f"crowded bucket, {n_crowded:,} hashes": [(f"c{i:07d}", rng.getrandbits(51)) for i in range(n_crowded)]}


def timed(fn, buckets, radius):
    t = time.process_time()
    edges = [e for (bi, _v), members in buckets.items() for e in fn(bi, members, radius)]
    return time.process_time() - t, near_dedup.component_roots(edges)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=20000)
    ap.add_argument("--shared", type=int, default=4000)
    ap.add_argument("--crowded", type=int, default=3000)
    ap.add_argument("--radius", type=int, default=4)
    args = ap.parse_args(argv)
    print("| case | every pair in Python (before) | bucket_pairs | speed-up | same components |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, items in cases(args.random, args.shared, args.crowded).items():
        buckets: dict = {}
        for uid, h in items:
            for key in near_dedup.blocks(h, args.radius):
                buckets.setdefault(key, []).append((uid, h))
        before, roots_before = timed(every_verified_pair, buckets, args.radius)
        after, roots_after = timed(near_dedup.bucket_pairs, buckets, args.radius)
        print(f"| {name} | {before:.3f} s | {after:.3f} s | {before / max(after, 1e-9):.0f}x | "
              f"{roots_before == roots_after} |", flush=True)
        if roots_before != roots_after:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
