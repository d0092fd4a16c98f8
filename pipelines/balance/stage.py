"""The second MetaCLIP balancing pass of a build, as a stage: the pool's ``ok`` rows minus excluded uids
(decontamination's drop list) -> the kept uid set, entry counts before/after, rejected rows (``not_sampled``).

Balancing is global over the whole current pool (entry counts change as data arrives) and deterministic per uid:
each row is kept when ``u(seed, uid) < keep_prob(its entries)``, so the same pool and seed keep the same rows on
any runner and in any order.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa

from pipelines.core import reasons, storage
from pipelines.core.config import Config, check
from pipelines.core.stage import Stage, StageResult
from pipelines.images.stage import pipeline_options, pool_files, read_rows, write_rows
from pipelines.balance.transforms import OK, REJECTED, Rebalance
from schemas import entry_counts as entry_counts_schema
from schemas import rejected as rejected_schema

KEPT_SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False)])


@dataclass(frozen=True)
class BalanceConfig(Config):
    """t (MetaCLIP's per-entry threshold) or target_size (t solved so the expected kept count is this)."""

    t: float | None = None
    target_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        check(self.t is None or (isinstance(self.t, (int, float)) and not isinstance(self.t, bool) and self.t > 0),
              "balance.t", f"expected a number > 0, got {self.t!r}")
        check(self.target_size is None or (isinstance(self.target_size, int) and self.target_size >= 1),
              "balance.target_size", f"expected an integer >= 1, got {self.target_size!r}")
        check(self.t is None or self.target_size is None, "balance", "give t or target_size, not both")
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "balance.seed",
              f"expected an integer, got {self.seed!r}")


class BalanceStage(Stage):
    """inputs: ``{"pool": POOL_DIR, "exclude": [Parquet files with a uid column, ...]}``; output: the balance dir
    (``kept.parquet``, ``entry_counts_before.parquet``, ``entry_counts_after.parquet``, ``t.json``);
    ``rejected``: one Parquet file (stage ``balance``, reason ``not_sampled``)."""

    name = "balance"

    def __init__(self, config: BalanceConfig, inputs, output: str, *, rejected: str | None = None,
                 beam_args: Sequence[str] = ()):
        if config.t is None and config.target_size is None:
            raise ValueError("BalanceStage: the config needs t or target_size")
        super().__init__(config, inputs, output,
                         rejected=rejected or storage.join(storage.parent(output), "rejected", "balance.parquet"),
                         beam_args=beam_args)

    @property
    def exclude(self) -> list[str]:
        return sorted(self.inputs.get("exclude") or [])

    def input_files(self) -> list[str]:
        return pool_files(self.inputs["pool"]) + self.exclude

    def compute(self, fingerprint: str) -> StageResult:
        cfg, out_dir, rejected_uri = self.config, self.output, self.rejected
        files = pool_files(self.inputs["pool"])
        excluded: set[str] = set()
        for uri in self.exclude:
            excluded.update(r["uid"] for r in read_rows([uri], columns=["uid"]))
        kept_uri = storage.join(out_dir, "kept.parquet")
        before_uri = storage.join(out_dir, "entry_counts_before.parquet")
        after_uri = storage.join(out_dir, "entry_counts_after.parquet")
        t_uri = storage.join(out_dir, "t.json")
        cols = ["uid", "url", "caption", "entry_ids", "status", "source"]

        def pool_rows(uri):
            for r in read_rows([uri], columns=cols):
                if r["status"] == "ok" and r["uid"] not in excluded:
                    yield r

        def write_counts(uri):
            return lambda pairs: write_rows(uri, [{"entry_id": int(e), "count": int(c)} for e, c in pairs],
                                            entry_counts_schema.SCHEMA, sort_key="entry_id")

        with beam.Pipeline(options=pipeline_options(self.beam_args)) as p:
            rows = p | "PoolFiles" >> beam.Create(files) | "ReadPool" >> beam.FlatMap(pool_rows)
            out = rows | "Rebalance" >> Rebalance(t=cfg.t, target_size=cfg.target_size, seed=cfg.seed)
            _ = (out[OK] | "KeptUids" >> beam.Map(lambda r: {"uid": r["uid"]}) | "AllKept" >> beam.combiners.ToList()
                 | "WriteKept" >> beam.Map(lambda rs: write_rows(kept_uri, rs, KEPT_SCHEMA)))
            _ = (out[REJECTED] | "AllDropped" >> beam.combiners.ToList()
                 | "WriteDropped" >> beam.Map(lambda rs: write_rows(rejected_uri, rs, rejected_schema.SCHEMA)))
            _ = out["counts_before"] | "AllBefore" >> beam.combiners.ToList() | "WriteBefore" >> beam.Map(
                write_counts(before_uri))
            _ = out["counts_after"] | "AllAfter" >> beam.combiners.ToList() | "WriteAfter" >> beam.Map(
                write_counts(after_uri))
            _ = out["t"] | "WriteT" >> beam.Map(lambda v: storage.write_bytes_atomic(t_uri, json.dumps(v).encode()))

        def counts(uri):
            return {str(int(r["entry_id"])): int(r["count"]) for r in read_rows([uri])}

        n_kept = len(read_rows([kept_uri]))
        n_dropped = len(read_rows([rejected_uri], columns=["uid"]))
        return StageResult(
            stage="balance", input_rows=n_kept + n_dropped, kept=n_kept, rejected={reasons.NOT_SAMPLED: n_dropped},
            outputs={"kept": kept_uri, "counts_before": before_uri, "counts_after": after_uri, "t": t_uri,
                     "rejected": rejected_uri},
            params=self.params(), fingerprint=fingerprint,
            details={"t": json.loads(storage.read_bytes(t_uri)), "seed": cfg.seed, "target_size": cfg.target_size,
                     "excluded": len(excluded), "counts_before": counts(before_uri),
                     "counts_after": counts(after_uri)})


def rebalance(pool_dir: str, out_dir: str, *, t: float | None = None, target_size: int | None = None,
              seed: int = 0, exclude: Sequence[str] = (), rejected_uri: str | None = None,
              pipeline_args: Sequence[str] | None = None) -> StageResult:
    """Run :class:`BalanceStage` (reusing a finished output with the same pool, exclusions and config)."""
    if (t is None) == (target_size is None):
        raise ValueError("rebalance: give exactly one of t or target_size")
    return BalanceStage(BalanceConfig(t=t, target_size=target_size, seed=seed),
                        {"pool": pool_dir, "exclude": list(exclude)}, out_dir, rejected=rejected_uri,
                        beam_args=pipeline_args or ()).run()


def kept_uids(balance_dir: str) -> list[str]:
    """The kept uid set written by the balance stage, sorted."""
    return [r["uid"] for r in read_rows([storage.join(balance_dir, "kept.parquet")])]
