"""Multi-index hashing: all pairs of 64-bit hashes within a Hamming radius without an all-pairs scan.

Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing" (CVPR 2012): split each hash into m
disjoint blocks; if H(a, b) <= r then by pigeonhole some block differs in at most floor(r / m) bits. One table per
block maps each block value to the sorted list of items holding it; a query probes every value within that small
block radius, and each candidate is checked on the full 64 bits. Everything is vectorised over a batch of queries.
A pair can surface in several blocks; it is kept only from the first block where it qualifies, so no
de-duplication pass is needed.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np

from pipelines.decontam.hashing import hamming

DIRECT_MAX_BITS = 24  # blocks up to 24 bits get a dense offsets table (<= 128 MiB); wider ones use searchsorted


def block_layout(n_blocks: int) -> list[tuple[int, int]]:
    """(shift, width) of each block, most significant first; widths differ by at most one bit."""
    widths = [64 // n_blocks + (1 if i < 64 % n_blocks else 0) for i in range(n_blocks)]
    out, hi = [], 64
    for w in widths:
        hi -= w
        out.append((hi, w))
    return out


def flip_masks(width: int, radius: int) -> np.ndarray:
    """Every value of weight <= radius in a ``width``-bit block (the XOR masks to probe)."""
    masks = [0]
    for k in range(1, radius + 1):
        for bits in combinations(range(width), k):
            masks.append(sum(1 << b for b in bits))
    return np.array(masks, dtype=np.int64)


_MASKS: dict[tuple[int, int], np.ndarray] = {}


def _masks(width: int, radius: int) -> np.ndarray:
    key = (width, radius)
    if key not in _MASKS:
        _MASKS[key] = flip_masks(width, radius)
    return _MASKS[key]


def choose_blocks(n_items: int, radius: int) -> int:
    """Blocks so that a block has about log2(n) bits (Norouzi's rule of thumb m ~ 64 / log2 n), 2 at least."""
    return int(np.clip(round(64 / max(np.log2(max(n_items, 2)), 1.0)), 2, max(2, radius + 1)))


class MultiIndexHash:
    """Hamming-radius search over a fixed set of uint64 hashes."""

    def __init__(self, hashes: np.ndarray, n_blocks: int | None = None, radius_hint: int = 8):
        self.hashes = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64))
        self.n_blocks = n_blocks or choose_blocks(len(self.hashes), radius_hint)
        if not 2 <= self.n_blocks <= 64:
            raise ValueError(f"n_blocks must be in 2..64 (blocks of at most 32 bits), got {self.n_blocks}")
        self.layout = block_layout(self.n_blocks)
        self.order: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        for shift, width in self.layout:
            keys = self._block(self.hashes, shift, width)
            order = np.argsort(keys, kind="stable")
            self.order.append(order.astype(np.int64))
            if width <= DIRECT_MAX_BITS:
                # Direct-address table: items with block value v are order[offsets[v]:offsets[v + 1]].
                counts = np.bincount(keys, minlength=1 << width)
                offsets = np.zeros((1 << width) + 1, dtype=np.int64)
                np.cumsum(counts, out=offsets[1:])
                self.offsets.append(offsets)
            else:  # too wide for a dense table: binary search in the sorted block values
                self.offsets.append(keys[order])

    def _bucket(self, b: int, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) in ``order[b]`` of the items whose block b equals each probe value."""
        tab = self.offsets[b]
        if self.layout[b][1] <= DIRECT_MAX_BITS:
            starts = tab[probes]
            return starts, tab[probes + 1] - starts
        starts = np.searchsorted(tab, probes, side="left")
        return starts, np.searchsorted(tab, probes, side="right") - starts

    @staticmethod
    def _block(h: np.ndarray, shift: int, width: int) -> np.ndarray:
        return ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    def search(self, queries: np.ndarray, radius: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (query row, item row, distance) with distance <= radius, sorted by query row then item row."""
        q = np.asarray(queries, dtype=np.uint64)
        parts = [self._search_chunk(q[i:i + chunk], radius, i) for i in range(0, len(q), chunk)]
        if not parts:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0, dtype=np.uint8)
        qi, ti, d = (np.concatenate(x) for x in zip(*parts))
        o = np.lexsort((ti, qi))
        return qi[o], ti[o], d[o]

    def block_radii(self, radius: int) -> list[int]:
        """Probe radius per block (Norouzi et al., Prop. 1 refined): with radius = m * s + a (0 <= a < m), a pair
        within ``radius`` has a block at distance <= s among the first a + 1 blocks or one at <= s - 1 among the
        rest (else the distance would be >= (a + 1)(s + 1) + (m - a - 1) s > radius). -1 = block not probed."""
        s, a = divmod(radius, self.n_blocks)
        return [min(s if b <= a else s - 1, w) for b, (_, w) in enumerate(self.layout)]

    def _search_chunk(self, q: np.ndarray, radius: int, base: int):
        radii = self.block_radii(radius)
        out_q, out_t = [], []
        for b, (shift, width) in enumerate(self.layout):
            if radii[b] < 0:
                continue
            masks = _masks(width, radii[b])
            probes = (self._block(q, shift, width)[:, None] ^ masks[None, :]).ravel()
            starts, lens = self._bucket(b, probes)
            hit = np.flatnonzero(lens)
            if len(hit) == 0:
                continue
            starts, lens = starts[hit], lens[hit]
            qrow = hit // len(masks)
            total = int(lens.sum())
            # Expand each non-empty bucket into its item rows without a Python loop.
            pos = np.repeat(starts - np.concatenate(([0], np.cumsum(lens)[:-1])), lens) + np.arange(total)
            out_q.append(np.repeat(qrow, lens))
            out_t.append(self.order[b][pos])
            # keep the block index to drop repeats below
            out_q[-1] = np.stack([out_q[-1], np.full(total, b)])
        if not out_q:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0, dtype=np.uint8)
        qb = np.concatenate(out_q, axis=1)
        qrow, blk = qb[0], qb[1]
        trow = np.concatenate(out_t)
        x = q[qrow] ^ self.hashes[trow]
        d = np.bitwise_count(x).astype(np.uint8)
        keep = d <= radius
        qrow, blk, trow, x, d = qrow[keep], blk[keep], trow[keep], x[keep], d[keep]
        # First block (in layout order) within its probe radius: the pair is kept only when found there.
        first = np.full(len(x), self.n_blocks, dtype=np.int64)
        for b in range(self.n_blocks - 1, -1, -1):
            shift, width = self.layout[b]
            bd = np.bitwise_count(self._block(x, shift, width))
            first[bd <= radii[b]] = b
        keep = first == blk
        return qrow[keep] + base, trow[keep], d[keep]


def brute_force_search(queries: np.ndarray, hashes: np.ndarray, radius: int, chunk: int = 256):
    """Vectorised all-pairs Hamming scan (the baseline MIH is measured against, and its correctness oracle)."""
    q = np.asarray(queries, dtype=np.uint64)
    h = np.asarray(hashes, dtype=np.uint64)
    out_q, out_t, out_d = [], [], []
    for i in range(0, len(q), chunk):
        d = hamming(q[i:i + chunk, None], h[None, :])
        qi, ti = np.nonzero(d <= radius)
        out_q.append(qi + i)
        out_t.append(ti)
        out_d.append(d[qi, ti])
    if not out_q:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0, dtype=np.uint8)
    return np.concatenate(out_q), np.concatenate(out_t), np.concatenate(out_d)
