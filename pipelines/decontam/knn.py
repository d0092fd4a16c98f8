"""Exact cosine search of query descriptors against an index of descriptors, in bounded memory.

``search`` returns every (query, index entry) pair with similarity >= ``threshold``, at most ``topk`` per query
(the most similar; ties broken by entry order), by blocked float32 matrix products: a block of queries times a
block of entries at a time, so memory stays under ``max_block`` similarities (default 4M = 16 MB) whatever the
sizes. With ``margin`` it also requires a pair to stand out from the query's other neighbours: similarity minus
the query's ``kth``-largest similarity over the whole index >= ``margin`` (a copy is one sharp peak; a
look-alike is one of many similar pictures; the score normalisation of copy-detection systems), unless the
similarity is >= ``high`` (a near-identical vector is a candidate however crowded its neighbourhood: the kth
neighbour rises with the size of the index, and pictures of a common kind, planes on a blue sky, have many). Exact (no approximation to measure); deterministic for a given BLAS thread count. It can also keep, per
index entry, the most similar query seen (``best``), which the audit uses to show the nearest unflagged pairs.

Throughput: one matrix product of d multiply-adds per pair plus a threshold scan; measured in
benchmarks/dedup_search.py (docs/benchmarks_decontam.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class BestPerEntry:
    """Running best query per index entry: similarity and the caller's query id (-1: none yet)."""

    sim: np.ndarray
    query: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "BestPerEntry":
        return cls(np.full(n, -np.inf, np.float32), np.full(n, -1, np.int64))


@dataclass
class KnnResult:
    query: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row into the queries
    entry: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row into the index
    sim: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    kth: np.ndarray | None = None  # per query: its kth-largest similarity (-inf when the index is smaller)


def search(queries: np.ndarray, index: np.ndarray, threshold: float, topk: int, *,
           max_block: int = 1 << 22, best: BestPerEntry | None = None, query_ids: np.ndarray | None = None,
           margin: float | None = None, kth: int = 10, high: float | None = None, nearest: int = 0,
           floor: float | None = None) -> KnnResult:
    """Pairs with cosine >= ``threshold`` (inputs are unit vectors) and, with ``margin``, cosine - the query's
    ``kth``-largest cosine >= ``margin`` unless cosine >= ``high``; also, with ``nearest`` > 0, the query's
    ``nearest`` most similar entries whose cosine is >= ``floor`` (whatever the threshold and margin); at most
    ``topk`` per query, sorted by query then descending similarity (ties by entry order).
    ``best`` (optional) is updated with each entry's most similar query, recorded as ``query_ids[row]``."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    e = np.ascontiguousarray(index, dtype=np.float32)
    nq, ne = len(q), len(e)
    if nq == 0 or ne == 0:
        return KnnResult()
    ids = np.arange(nq, dtype=np.int64) if query_ids is None else np.asarray(query_ids, np.int64)
    eb = int(min(ne, max(1024, max_block // 64)))  # entries per block
    qb = int(max(1, min(nq, max_block // eb)))  # queries per block
    out_q, out_e, out_s = [], [], []
    use_kth = margin is not None and kth >= 1
    use_near = nearest > 0 and floor is not None
    check_topk = max(topk, nearest) if use_near else topk  # a block's rows keep at least the nearest entries
    lo = min(threshold, floor) if use_near else threshold
    kth_all = np.full(nq, -np.inf, np.float32)
    for q0 in range(0, nq, qb):
        qs = q[q0:q0 + qb]
        hits_q, hits_e, hits_s = [], [], []
        tops = None  # running top-kth similarities per query row
        for e0 in range(0, ne, eb):
            sims = qs @ e[e0:e0 + eb].T
            if use_kth:  # keep the kth largest similarities seen so far per query
                k = min(kth, sims.shape[1])
                part = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
                tops = part if tops is None else np.concatenate([tops, part], 1)
                if tops.shape[1] > kth:
                    tops = np.partition(tops, tops.shape[1] - kth, axis=1)[:, -kth:]
            if best is not None:
                col = np.argmax(sims, axis=0)
                val = sims[col, np.arange(sims.shape[1])]
                upd = val > best.sim[e0:e0 + eb]
                best.sim[e0:e0 + eb][upd] = val[upd]
                best.query[e0:e0 + eb][upd] = ids[q0 + col[upd]]
            r, c = np.nonzero(sims >= lo)
            if len(r) > check_topk * len(qs):  # bound memory at a low threshold: keep each row's top-k of this block
                r, c = _rows_topk(sims, r, c, check_topk)
            if len(r):
                hits_q.append(r.astype(np.int64) + q0)
                hits_e.append(c.astype(np.int64) + e0)
                hits_s.append(sims[r, c])
        if use_kth and tops is not None and tops.shape[1] >= kth:
            kth_all[q0:q0 + len(qs)] = tops.min(axis=1)
        if not hits_q:
            continue
        hq, he, hs = np.concatenate(hits_q), np.concatenate(hits_e), np.concatenate(hits_s)
        hq, he, hs = _sorted(hq, he, hs)
        ok = hs >= threshold
        if use_kth:
            ok &= hs - kth_all[hq] >= margin
            if high is not None:
                ok |= (hs >= high) & (hs >= threshold)
        if use_near:  # every entry >= floor is a hit, so the rank among hits is the rank over the whole index
            ok |= (_ranks(hq) < nearest) & (hs >= floor)
        hq, he, hs = hq[ok], he[ok], hs[ok]
        keep = _ranks(hq) < topk
        out_q.append(hq[keep])
        out_e.append(he[keep])
        out_s.append(hs[keep])
    kth_out = kth_all if use_kth else None
    if not out_q:
        return KnnResult(kth=kth_out)
    return KnnResult(np.concatenate(out_q), np.concatenate(out_e), np.concatenate(out_s).astype(np.float32),
                     kth_out)


def _sorted(hq: np.ndarray, he: np.ndarray, hs: np.ndarray):
    order = np.lexsort((he, -hs, hq))  # per query: most similar first, then entry order
    return hq[order], he[order], hs[order]


def _ranks(hq: np.ndarray) -> np.ndarray:
    """Position of each hit within its query's run (hits sorted by query)."""
    if len(hq) == 0:
        return np.zeros(0, np.int64)
    first = np.r_[0, np.flatnonzero(np.diff(hq)) + 1]
    return np.arange(len(hq)) - np.repeat(first, np.diff(np.r_[first, len(hq)]))


def _rows_topk(sims: np.ndarray, r: np.ndarray, c: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(r, minlength=len(sims))
    keep = counts[r] <= topk
    rr, cc = [r[keep]], [c[keep]]
    for row in np.flatnonzero(counts > topk):
        cols = c[r == row]
        vals = sims[row, cols]
        sel = cols[np.lexsort((cols, -vals))[:topk]]
        rr.append(np.full(len(sel), row, r.dtype))
        cc.append(sel)
    r, c = np.concatenate(rr), np.concatenate(cc)
    order = np.lexsort((c, r))
    return r[order], c[order]


def brute_force(queries: np.ndarray, index: np.ndarray, threshold: float, topk: int,
                margin: float | None = None, kth: int = 10, high: float | None = None, nearest: int = 0,
                floor: float | None = None) -> KnnResult:
    """Reference: the full similarity matrix at once (tests compare :func:`search` with it)."""
    sims = np.asarray(queries, np.float32) @ np.asarray(index, np.float32).T
    out_q, out_e, out_s = [], [], []
    kths = np.full(len(sims), -np.inf, np.float32)
    for i, row in enumerate(sims):
        if margin is not None and len(row) >= kth:
            kths[i] = np.sort(row)[::-1][kth - 1]
        stands_out = row - kths[i] >= (margin if margin is not None else -np.inf)
        if high is not None:
            stands_out |= row >= high
        ok = (row >= threshold) & stands_out
        if nearest > 0 and floor is not None:
            order = np.lexsort((np.arange(len(row)), -row))
            near = np.zeros(len(row), bool)
            near[order[:nearest]] = True
            ok |= near & (row >= floor)
        cols = np.flatnonzero(ok)
        cols = cols[np.lexsort((cols, -row[cols]))][:topk]
        out_q += [i] * len(cols)
        out_e += cols.tolist()
        out_s += row[cols].tolist()
    return KnnResult(np.array(out_q, np.int64), np.array(out_e, np.int64), np.array(out_s, np.float32),
                     kths if margin is not None else None)
