"""Multi-index hashing: all pairs of 64-bit hashes within a Hamming radius without an all-pairs scan.

Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing" (CVPR 2012): split each hash into m
disjoint blocks; if H(a, b) <= r then by pigeonhole some block differs in at most floor(r / m) bits (refined: with
r = m s + a, one of the first a + 1 blocks within s or one of the others within s - 1, see ``block_radii``). One
table per block maps each block value to the items holding it; a query probes every value within the block's probe
radius, and each candidate is checked on the full 64 bits. Everything is vectorised over a batch of queries: a
probe reads a small bucket-size table (cache-resident for 16-bit blocks) and, when the bucket is not empty, one
contiguous row of the bucket's first K hashes, so the common case needs no per-candidate index expansion.
A pair can surface in several blocks; it is kept only from the first block where it qualifies, so no
de-duplication pass is needed.
"""
from __future__ import annotations

from itertools import combinations
from math import comb

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


_OWNER: dict[tuple[int, int], np.ndarray] = {}


def _probe_owner(n_queries: int, n_masks: int) -> np.ndarray:
    """Query row of each entry of a (n_queries x n_masks) probe matrix, flattened."""
    key = (n_queries, n_masks)
    if key not in _OWNER:
        if len(_OWNER) > 8:
            _OWNER.clear()
        _OWNER[key] = np.repeat(np.arange(n_queries, dtype=np.int64), n_masks)
    return _OWNER[key]


CANDIDATE_COST = 0.2  # cost of one random candidate relative to one probe (measured: a probe that hits a bucket
#                      pays for gathering its slot row, while the candidates in that row are compared in one go)


def search_cost(n_items: int, radius: int, n_blocks: int) -> float:
    """Estimated work per query: probes plus weighted expected random candidates (uniform hashes)."""
    layout = block_layout(n_blocks)
    s, a = divmod(radius, n_blocks)
    cost = 0.0
    for b, (_, w) in enumerate(layout):
        r = min(s if b <= a else s - 1, w)
        if r >= 0:
            vol = sum(comb(w, k) for k in range(r + 1))
            cost += vol + CANDIDATE_COST * n_items * vol / 2.0**w
    return cost


def choose_blocks(n_items: int, radius: int) -> int:
    """The block count (3..8, blocks of 8..22 bits, dense tables) with the least estimated search cost."""
    return min(range(3, 9), key=lambda m: (search_cost(n_items, radius, m), m))


class MultiIndexHash:
    """Hamming-radius search over a fixed set of uint64 hashes."""

    def __init__(self, hashes: np.ndarray, n_blocks: int | None = None, radius_hint: int = 8):
        self.hashes = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64))
        self.n_blocks = n_blocks or choose_blocks(len(self.hashes), radius_hint)
        if not 2 <= self.n_blocks <= 64:
            raise ValueError(f"n_blocks must be in 2..64 (blocks of at most 32 bits), got {self.n_blocks}")
        self.layout = block_layout(self.n_blocks)
        itype = np.int32 if len(self.hashes) < 2**31 else np.int64
        self.order: list[np.ndarray] = []  # item rows sorted by block value
        self.sorted_hashes: list[np.ndarray] = []  # hashes in that order: bucket items are contiguous in memory
        self.counts: list[np.ndarray] = []  # direct tables: bucket sizes, the narrowest dtype that holds them
        self.starts: list[np.ndarray] = []  # direct tables: bucket start; wide blocks: sorted block values
        self.slots: list[np.ndarray | None] = []  # direct tables: (2^width, K) first K hashes of each bucket
        for shift, width in self.layout:
            keys = self._block(self.hashes, shift, width)
            order = np.argsort(keys, kind="stable").astype(itype)
            self.order.append(order)
            self.sorted_hashes.append(self.hashes[order])
            if width <= DIRECT_MAX_BITS:
                # Direct-address table: items with block value v are order[starts[v]:starts[v] + counts[v]]. The
                # counts table is what every probe reads, so it is kept small (uint8 for 16-bit blocks = 64 KiB,
                # cache-resident); the starts are read only for the probes that hit a non-empty bucket.
                counts = np.bincount(keys, minlength=1 << width)
                cmax = int(counts.max()) if len(counts) else 0
                ctype = np.uint8 if cmax < 2**8 else np.uint16 if cmax < 2**16 else np.int64
                starts = np.zeros(1 << width, dtype=np.int64)
                np.cumsum(counts[:-1], out=starts[1:])
                self.counts.append(counts.astype(ctype))
                self.starts.append(starts.astype(itype))
                # Bucket-major copy of the first K hashes of every bucket, K ~ the 95th percentile of non-empty
                # bucket sizes: a probe's candidates are then one contiguous row, compared without expanding
                # (np.repeat) bucket ranges, which dominated the search time. Larger buckets spill (see search).
                nz = counts[counts > 0]
                k = int(np.clip(np.percentile(nz, 95), 1, 8)) if len(nz) else 1
                sk = keys[order]
                rank = np.arange(len(sk)) - starts[sk]
                sel = rank < k
                slots = np.zeros((1 << width, k), dtype=np.uint64)
                slots[sk[sel], rank[sel]] = self.sorted_hashes[-1][sel]
                self.slots.append(slots)
            else:  # too wide for a dense table: binary search in the sorted block values
                self.counts.append(np.zeros(0, np.int64))
                self.starts.append(keys[order])
                self.slots.append(None)

    def _bucket(self, b: int, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probe rows, start, length) of the probes that hit a non-empty bucket of block b."""
        if self.layout[b][1] <= DIRECT_MAX_BITS:
            lens = self.counts[b][probes]
            hit = np.flatnonzero(lens)
            return hit, self.starts[b][probes[hit]].astype(np.int64), lens[hit].astype(np.int64)
        tab = self.starts[b]
        starts = np.searchsorted(tab, probes, side="left")
        lens = np.searchsorted(tab, probes, side="right") - starts
        hit = np.flatnonzero(lens)
        return hit, starts[hit], lens[hit]

    @staticmethod
    def _block(h: np.ndarray, shift: int, width: int) -> np.ndarray:
        return ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    def block_radii(self, radius: int) -> list[int]:
        """Probe radius per block (Norouzi et al., Prop. 1 refined): with radius = m * s + a (0 <= a < m), a pair
        within ``radius`` has a block at distance <= s among the first a + 1 blocks or one at <= s - 1 among the
        rest (else the distance would be >= (a + 1)(s + 1) + (m - a - 1) s > radius). -1 = block not probed."""
        s, a = divmod(radius, self.n_blocks)
        return [min(s if b <= a else s - 1, w) for b, (_, w) in enumerate(self.layout)]

    def probes_per_query(self, radius: int) -> int:
        return sum(len(_masks(w, r)) for (_, w), r in zip(self.layout, self.block_radii(radius)) if r >= 0)

    def search(self, queries: np.ndarray, radius: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (query row, item row, distance) with distance <= radius, sorted by query row then item row."""
        q = np.asarray(queries, dtype=np.uint64)
        # Bound the (chunk x probes) temporaries to ~250k entries whatever the radius: they then stay in cache
        # (measured 2x faster than 4M-entry chunks).
        chunk = max(64, min(chunk, 250_000 // max(1, self.probes_per_query(radius))))
        parts = [self._search_chunk(q[i:i + chunk], radius, i) for i in range(0, len(q), chunk)]
        parts = [p for p in parts if len(p[0])]
        if not parts:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0, dtype=np.uint8)
        qi, ti, d = (np.concatenate(x) for x in zip(*parts))
        o = np.lexsort((ti, qi))
        return qi[o], ti[o], d[o]

    def _search_chunk(self, q: np.ndarray, radius: int, base: int):
        radii = self.block_radii(radius)
        out = []
        for b, (shift, width) in enumerate(self.layout):
            if radii[b] < 0:
                continue
            masks = _masks(width, radii[b])
            probes = (self._block(q, shift, width)[:, None] ^ masks[None, :]).ravel()
            if self.slots[b] is not None:
                out.extend(self._probe_slots(b, q, probes, len(masks), radius, radii, base))
                continue
            hit, starts, lens = self._bucket(b, probes)
            if len(hit) == 0:
                continue
            qrow = _probe_owner(len(q), len(masks))[hit]  # a gather is cheaper than an integer division
            total = int(lens.sum())
            if total == len(hit):  # every bucket hit holds one item (sparse tables): nothing to expand
                pos = starts
            else:  # expand each non-empty bucket into its positions without a Python loop
                qrow = np.repeat(qrow, lens)
                pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)
            out.append(self._verify(b, q, qrow, pos, radius, radii, base))
        if not out:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0, dtype=np.uint8)
        return tuple(np.concatenate(x) for x in zip(*out))


    def _verify(self, b, q, qrow, pos, radius, radii, base):
        """Candidates (query row, position in block b's order) -> the pairs within radius that block b owns."""
        d = np.bitwise_count(q[qrow] ^ self.sorted_hashes[b][pos])
        keep = np.flatnonzero(d <= radius)
        qrow, pos, d = qrow[keep], pos[keep], d[keep].astype(np.uint8)
        return self._owned(b, q, qrow, pos, d, radii, base)

    def _owned(self, b, q, qrow, pos, d, radii, base):
        # A pair can qualify in several blocks: keep it only from the first block within its probe radius.
        x = q[qrow] ^ self.sorted_hashes[b][pos]
        first = np.ones(len(x), dtype=bool)
        for b2 in range(b):
            if radii[b2] >= 0:
                first &= np.bitwise_count(self._block(x, *self.layout[b2])) > radii[b2]
        return qrow[first].astype(np.int64) + base, self.order[b][pos[first]].astype(np.int64), d[first]

    def _probe_slots(self, b, q, probes, n_masks, radius, radii, base):
        """Direct-table probe through the bucket-major slots; buckets larger than K spill to the range path."""
        slots = self.slots[b]
        k = slots.shape[1]
        lens = self.counts[b][probes]
        hit = np.flatnonzero(lens)
        if len(hit) == 0:
            return []
        p, qrow, lens = probes[hit], _probe_owner(len(q), n_masks)[hit], lens[hit].astype(np.int64)
        d = np.bitwise_count(slots[p] ^ q[qrow][:, None])
        ok = d <= radius
        if k > 1 or lens.max() > 1:
            ok &= np.arange(k)[None, :] < lens[:, None]
        hi, j = np.nonzero(ok)
        starts = self.starts[b]
        parts = [self._owned(b, q, qrow[hi], starts[p[hi]].astype(np.int64) + j, d[hi, j].astype(np.uint8),
                             radii, base)]
        big = np.flatnonzero(lens > k)
        if len(big):  # the rest of the oversized buckets, expanded as ranges
            extra = lens[big] - k
            total = int(extra.sum())
            qr = np.repeat(qrow[big], extra)
            pos = np.repeat(starts[p[big]].astype(np.int64) + k - (np.cumsum(extra) - extra), extra) + np.arange(total)
            parts.append(self._verify(b, q, qr, pos, radius, radii, base))
        return parts


def hamming_join(a: np.ndarray, b: np.ndarray, radius: int, n_blocks: int | None = None):
    """All (row in a, row in b, distance) within ``radius``, sorted by a row then b row: the batch mode of the
    search, for when both sides are known up front (an audit of a hashed pool). The larger side is indexed: the
    number of probes grows with the queries and the number of random candidates with the table's density, and a
    bigger table affords wider blocks (fewer candidates per probe), so the smaller side should do the probing."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    if len(a) >= len(b):
        bi, ai, d = MultiIndexHash(a, n_blocks=n_blocks, radius_hint=radius).search(b, radius)
        o = np.lexsort((bi, ai))
        return ai[o], bi[o], d[o]
    return MultiIndexHash(b, n_blocks=n_blocks, radius_hint=radius).search(a, radius)


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
