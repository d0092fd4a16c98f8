"""Near-duplicate search over 64-bit pHashes without all-pairs: multi-index hashing and connected components.

Pigeonhole (Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing"): split the 64 bits into
``radius + 1`` disjoint blocks; two hashes within Hamming distance ``radius`` agree exactly on at least one block.
So candidates are only pairs that share a (block index, block value) bucket; each candidate is verified by its
real distance. Near duplicates form connected components and each component keeps its smallest uid.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence


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


def bucket_pairs(block_index: int, members: Sequence[tuple[str, int]], radius: int) -> list[tuple[str, str]]:
    """Verified near-duplicate pairs (smaller uid first) of one bucket.

    A pair that agrees on several blocks is reported only from the lowest such block, so no pair comes out twice.
    """
    bounds = block_bounds(radius)
    items = sorted(members)
    out = []
    for i in range(len(items)):
        ua, ha = items[i]
        for j in range(i + 1, len(items)):
            ub, hb = items[j]
            x = int(ha) ^ int(hb)
            if x.bit_count() > radius:
                continue
            first = next(k for k, (shift, w) in enumerate(bounds) if (x >> shift) & ((1 << w) - 1) == 0)
            if first == block_index:
                out.append((ua, ub) if ua < ub else (ub, ua))
    return out


def component_roots(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """uid -> smallest uid of its connected component, for every uid that is not its component's smallest."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            # union by smaller uid: the root of a component is always its smallest uid
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    return {x: find(x) for x in list(parent) if find(x) != x}
