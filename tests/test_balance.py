"""MetaCLIP balancing math: p_e, keep probability, the deterministic draw and sizing t for a target."""
import math
import random

import numpy as np
import pytest

from pipelines.balance import metaclip as B


def test_entry_prob():
    assert B.entry_prob(5, 10) == 1.0
    assert B.entry_prob(10, 10) == 1.0  # t / count == 1 at count == t
    assert B.entry_prob(40, 10) == pytest.approx(0.25)


def test_keep_probability_formula():
    counts = {0: 5, 1: 40, 2: 100}
    t = 10
    assert B.keep_probability([0], counts, t) == 1.0  # a tail entry keeps the pair for sure
    assert B.keep_probability([1], counts, t) == pytest.approx(0.25)
    expected = 1 - (1 - 0.25) * (1 - 0.1)
    assert B.keep_probability([1, 2], counts, t) == pytest.approx(expected)
    assert B.keep_probability([0, 1, 2], counts, t) == 1.0
    assert B.keep_probability([], counts, t) == 0.0


def test_draw_is_deterministic_and_uniform():
    draws = [B.uniform_draw(3, f"uid{i}") for i in range(20000)]
    assert draws == [B.uniform_draw(3, f"uid{i}") for i in range(20000)]
    assert draws != [B.uniform_draw(4, f"uid{i}") for i in range(20000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert abs(np.mean(draws) - 0.5) < 0.01
    # kept fraction follows keep_prob
    kept = sum(B.is_kept(3, f"uid{i}", 0.3) for i in range(20000))
    assert abs(kept / 20000 - 0.3) < 0.015


def test_head_entries_capped_near_t():
    rng = random.Random(0)
    # entry 0 is a head entry in 5000 pairs, entries 1..50 are tail entries
    pairs = [[0] for _ in range(5000)] + [[rng.randint(1, 50)] for _ in range(500)]
    counts = np.bincount([e for p in pairs for e in p])
    t = 200
    kept0 = sum(B.is_kept(1, f"u{i}", B.keep_probability(p, counts, t)) for i, p in enumerate(pairs) if p == [0])
    assert abs(kept0 - t) < 4 * math.sqrt(t)


def test_vectorised_expected_matches_reference():
    rng = random.Random(1)
    pairs = [[rng.randint(0, 30) for _ in range(rng.randint(0, 4))] for _ in range(3000)]
    counts = np.bincount([e for p in pairs for e in p], minlength=31)
    csr = B._CSR(pairs, counts)
    for t in (1.0, 7.5, 50.0, 500.0):
        assert csr.expected(t) == pytest.approx(B.expected_kept(pairs, counts, t), rel=1e-9)


def test_solve_t_hits_target():
    rng = random.Random(2)
    pairs = [[min(int(rng.paretovariate(1.0)), 999) for _ in range(rng.randint(1, 3))] for _ in range(20000)]
    counts = np.bincount([e for p in pairs for e in p], minlength=1000)
    t = B.solve_t(pairs, counts, 5000)
    assert B.expected_kept(pairs, counts, t) == pytest.approx(5000, rel=1e-3)
    assert B.solve_t(pairs, counts, 10**9) == counts.max() + 1  # keep everything
    as_dict = {i: int(c) for i, c in enumerate(counts) if c}
    assert B.solve_t(pairs, as_dict, 5000) == t  # a Mapping of counts works too


def test_solve_t_from_sample_close_to_exact():
    rng = random.Random(3)
    pairs = [[min(int(rng.paretovariate(0.8)), 4999) for _ in range(rng.randint(1, 3))] for _ in range(40000)]
    counts = np.bincount([e for p in pairs for e in p], minlength=5000)
    exact = B.solve_t(pairs, counts, 10000)
    sample = pairs[::4]  # a uniform (deterministic) quarter of the pool
    approx = B.solve_t_from_sample(sample, counts, 10000, len(pairs))
    assert B.expected_kept(pairs, counts, approx) == pytest.approx(10000, rel=0.03)
    assert approx == pytest.approx(exact, rel=0.1)
