"""Beam composite transform of the balance stage: MetaCLIP's balancing redone on the pool that survived.

Rows are dicts shaped like ``schemas.sample`` rows; rejected rows carry ``stage`` and ``reason`` (the images stage's
convention, :data:`pipelines.images.transforms.OK` / ``REJECTED`` outputs), so the funnel adds up.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam import pvalue

from pipelines.balance import metaclip as balance
from pipelines.images.transforms import OK, REJECTED, reject_row


def _entry_lists(rows):
    return [list(r["entry_ids"]) for r in rows]


def _dense_counts(counts: dict) -> np.ndarray:
    """Entry counts as an array indexed by entry id (balance.solve_t evaluates over arrays)."""
    dense = np.zeros(max(counts, default=-1) + 1, dtype=np.int64)
    for e, c in counts.items():
        dense[int(e)] = int(c)
    return dense


def _solve_t(rows, counts, target):
    return float(balance.solve_t(_entry_lists(rows), _dense_counts(counts), target))


class Rebalance(beam.PTransform):
    """MetaCLIP's balancing redone on the surviving pool: recount entries, keep with 1 - prod(1 - p_e).

    The counts come from a Beam combine over the pool that actually survived; ``t`` is given, or solved with
    :func:`pipelines.balance.solve_t` so the expected kept count reaches ``target_size``. The draw depends only on
    (seed, uid). Outputs: ``ok`` kept rows, ``rejected`` rows (reason ``not_sampled``), ``counts_before``
    and ``counts_after`` ((entry_id, count) pairs) and ``t`` (a singleton).
    """

    def __init__(self, t: float | None = None, target_size: int | None = None, seed: int = 0):
        super().__init__()
        if (t is None) == (target_size is None):
            raise ValueError("Rebalance: give exactly one of t or target_size")
        self.t, self.target_size, self.seed = t, target_size, seed

    def expand(self, rows):
        counts_before = (rows
                         | "EntriesBefore" >> beam.FlatMap(lambda r: list(r["entry_ids"]))
                         | "CountBefore" >> beam.combiners.Count.PerElement())
        counts_dict = beam.pvalue.AsDict(counts_before)
        if self.t is not None:
            t_value = rows.pipeline | "GivenT" >> beam.Create([float(self.t)])
        else:
            target = self.target_size
            t_value = (rows
                       | "AllEntryLists" >> beam.combiners.ToList()
                       | "SolveT" >> beam.Map(_solve_t, counts_dict, target))
        seed = self.seed

        def decide(row, counts, t):
            p = balance.keep_probability(row["entry_ids"], counts, t)
            if balance.is_kept(seed, row["uid"], p):
                yield row
            else:
                yield pvalue.TaggedOutput(REJECTED, reject_row(row, "balance", "not_sampled"))

        decided = rows | "Draw" >> beam.FlatMap(decide, counts_dict, beam.pvalue.AsSingleton(t_value)).with_outputs(
            REJECTED, main=OK)
        counts_after = (decided[OK]
                        | "EntriesAfter" >> beam.FlatMap(lambda r: list(r["entry_ids"]))
                        | "CountAfter" >> beam.combiners.Count.PerElement())
        return {OK: decided[OK], REJECTED: decided[REJECTED], "counts_before": counts_before,
                "counts_after": counts_after, "t": t_value}
