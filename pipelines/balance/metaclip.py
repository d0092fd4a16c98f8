"""MetaCLIP balancing math: per-entry sampling probabilities and the deterministic per-uid draw.

MetaCLIP ("Demystifying CLIP Data", Alg. 1): an entry with count c_e keeps each of its pairs with
p_e = 1 if c_e < t else t / c_e; a pair matching entries E is kept with probability 1 - prod_{e in E} (1 - p_e).
The draw is u = hash(seed, uid) / 2**64, kept when u < keep_prob, so any runner and any worker count keep the
same pairs.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_T = 20_000


def entry_prob(count: int, t: float) -> float:
    """p_e = 1 if count < t else t / count."""
    if count < t:
        return 1.0
    return t / count


def keep_probability(entry_ids: Sequence[int], counts: Mapping[int, int] | np.ndarray, t: float) -> float:
    """1 - prod over matched entries of (1 - p_e); 0 for a pair that matched nothing."""
    miss = 1.0
    for e in entry_ids:
        miss *= 1.0 - entry_prob(int(counts[e]), t)
        if miss == 0.0:
            return 1.0
    return 1.0 - miss


def uniform_draw(seed: int, uid: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, uid)."""
    digest = hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_kept(seed: int, uid: str, keep_prob: float) -> bool:
    return uniform_draw(seed, uid) < keep_prob


def expected_kept(entry_lists: Iterable[Sequence[int]], counts: Mapping[int, int] | np.ndarray, t: float) -> float:
    """Sum of keep probabilities over pairs (reference implementation, one pair at a time)."""
    return math.fsum(keep_probability(ids, counts, t) for ids in entry_lists)


class _CSR:
    """Pairs' matched-entry counts as one flat array plus row offsets, for vectorised evaluation over t."""

    def __init__(self, entry_lists: Sequence[Sequence[int]], counts):
        lengths = np.fromiter((len(ids) for ids in entry_lists), np.int64, len(entry_lists))
        flat = np.fromiter((e for ids in entry_lists for e in ids), np.int64, int(lengths.sum()))
        if isinstance(counts, Mapping):
            self.counts = np.fromiter((counts[int(e)] for e in flat), np.float64, len(flat))
        else:
            self.counts = np.asarray(counts, np.float64)[flat] if len(flat) else np.zeros(0)
        self.nonempty = lengths > 0
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[self.nonempty]

    def expected(self, t: float) -> float:
        if not len(self.counts):
            return 0.0
        p = np.minimum(1.0, t / np.maximum(self.counts, 1e-300))
        with np.errstate(divide="ignore"):
            log_miss = np.log1p(-p)  # -inf where p == 1: that pair is kept for sure
        miss = np.exp(np.add.reduceat(log_miss, self.starts))
        return float(np.sum(1.0 - miss))

    def max_count(self) -> int:
        return int(self.counts.max()) if len(self.counts) else 0


def solve_t(entry_lists: Sequence[Sequence[int]], counts: Mapping[int, int] | np.ndarray, target: float,
            *, rel_tol: float = 1e-4) -> float:
    """The t whose expected kept count over ``entry_lists`` is ``target`` (bisection: it grows with t).

    When the target is at least the number of matched pairs, every pair is kept: t = max count + 1.
    """
    if target <= 0:
        raise ValueError("target size must be positive")
    csr = _CSR(entry_lists, counts)
    hi = float(csr.max_count() + 1)
    if target >= int(csr.nonempty.sum()) or hi <= 1:
        return hi
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if csr.expected(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= rel_tol * hi:
            break
    return hi


def solve_t_from_sample(sample_lists: Sequence[Sequence[int]], counts, target: float, pool_size: int) -> float:
    """solve_t on a uniform sample of the pool, with the target scaled to the sample (exact for a full sample)."""
    if not sample_lists:
        return float(DEFAULT_T)
    scaled = target * len(sample_lists) / max(pool_size, 1)
    return solve_t(sample_lists, counts, scaled)
