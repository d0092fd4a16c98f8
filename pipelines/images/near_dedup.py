"""Near-duplicate search over 64-bit pHashes without all-pairs: multi-index hashing and connected components.

Pigeonhole (Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing"): split the 64 bits into
``radius + 1`` disjoint blocks; two hashes within Hamming distance ``radius`` agree exactly on at least one block.
So candidates are only pairs that share a (block index, block value) bucket; each candidate is verified by its
real distance. Near duplicates form connected components and each component keeps its smallest uid.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def block_bounds(radius: int, bits: int = 64) -> list[tuple[int, int]]:
    """(shift, width) of ``radius + 1`` near-equal contiguous blocks covering ``bits`` bits, most significant first."""
    if radius < 0 or radius >= bits:
        raise ValueError(f"near-duplicate radius must be in [0, {bits - 1}], got {radius}")
    n = radius + 1
    widths = [bits // n + (1 if i < bits % n else 0) for i in range(n)]
    out, top = [], bits
    for w in widths:
        top -= w
        out.append((top, w))
    return out


def blocks(h: int, radius: int) -> list[tuple[int, int]]:
    """(block index, block value) keys of hash ``h`` for radius ``radius``."""
    return [(i, (int(h) >> shift) & ((1 << w) - 1)) for i, (shift, w) in enumerate(block_bounds(radius))]


def hamming64(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


def _first_zero_block(x: int, bounds: list[tuple[int, int]]) -> int:
    return next(k for k, (shift, w) in enumerate(bounds) if (x >> shift) & ((1 << w) - 1) == 0)


def bucket_pairs(block_index: int, members: Sequence[tuple[str, int]], radius: int) -> list[tuple[str, str]]:
    """Near-duplicate edges (smaller uid first) of one bucket: enough to give the same connected components as
    every verified pair.

    Members with the same hash are chained (each to the next, in uid order) and only their smallest uid is
    compared with the other hashes: a placeholder image a million pages share costs a million edges, not 10^12
    comparisons. The remaining comparisons run in numpy once a bucket has more than ``_NUMPY_FROM`` distinct hashes.
    A pair that agrees on several blocks is reported only from the lowest such block (identical hashes: block 0),
    so no edge comes out twice.
    """
    if len(members) < 2:
        return []
    bounds = block_bounds(radius)
    groups: dict[int, list[str]] = {}
    reps = []  # (smallest uid, hash) of each distinct hash, in uid order
    for uid, h in sorted(members):
        h = int(h)
        uids = groups.get(h)
        if uids is None:
            groups[h] = [uid]
            reps.append((uid, h))
        else:
            uids.append(uid)
    out = []
    if block_index == 0 and len(reps) < len(members):
        for uids in groups.values():
            out.extend(zip(uids, uids[1:]))
    if len(reps) > _NUMPY_FROM:
        return out + _distinct_pairs_numpy(block_index, reps, radius, bounds)
    for i in range(len(reps)):
        ua, ha = reps[i]
        for j in range(i + 1, len(reps)):
            ub, hb = reps[j]
            x = ha ^ hb
            if x.bit_count() <= radius and _first_zero_block(x, bounds) == block_index:
                out.append((ua, ub))
    return out


_NUMPY_FROM = 48  # distinct hashes in a bucket from which the pairwise check runs in numpy


def _distinct_pairs_numpy(block_index: int, reps: list[tuple[str, int]], radius: int,
                          bounds: list[tuple[int, int]]) -> list[tuple[str, str]]:
    hashes = np.array([h for _u, h in reps], dtype=np.uint64)
    out = []
    for i in range(len(reps) - 1):
        close = np.flatnonzero(np.bitwise_count(hashes[i + 1:] ^ hashes[i]) <= radius)
        for j in close:
            ub, hb = reps[i + 1 + int(j)]
            if _first_zero_block(reps[i][1] ^ hb, bounds) == block_index:
                out.append((reps[i][0], ub))
    return out


def find(parent: dict[str, str], x: str) -> str:
    """The root of ``x`` in the forest ``parent`` (uids without an entry are roots), compressing the path."""
    root = x
    while parent.get(root, root) != root:
        root = parent[root]
    while parent.get(x, x) != root:
        parent[x], x = root, parent[x]
    return root


def union(parent: dict[str, str], a: str, b: str) -> None:
    """Join the components of ``a`` and ``b``; the root of a component is always its smallest uid."""
    ra, rb = find(parent, a), find(parent, b)
    if ra != rb:
        if ra < rb:
            parent[rb] = ra
        else:
            parent[ra] = rb


def flatten(parent: dict[str, str]) -> dict[str, str]:
    """uid -> its root, for the uids that are not roots (the smallest form of the same forest)."""
    out = {}
    for x in list(parent):
        r = find(parent, x)
        if r != x:
            out[x] = r
    return out


def component_roots(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """uid -> smallest uid of its connected component, for every uid that is not its component's smallest."""
    parent: dict[str, str] = {}
    for a, b in edges:
        union(parent, a, b)
    return flatten(parent)
