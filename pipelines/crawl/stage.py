"""The crawl as a :class:`~pipelines.core.stage.Stage`: candidates in, published webdataset shards out, every
failure written as a rejected row.

    stage = CrawlStage(CrawlConfig(...), {"candidates": "BUILD/curate/candidates"}, "BUILD/crawl",
                       rejected="BUILD/rejected/crawl.parquet", progress=hook, log_file="BUILD/logs/crawl.log")
    result = stage.run()        # StageResult(stage="crawl", input_rows, kept, rejected={reason: n}, ...)

``compute`` runs round 0 and ``config.recrawl_rounds`` re-crawl rounds (each resumes what a killed run left),
then writes one rejected row per candidate without an image (uid, url, caption, stage="crawl", reason, source).
``result.details`` holds the rounds (URLs, successes, download time, worker CPU) and the per-host report.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.stage import Stage, StageResult
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.driver import candidate_files, crawl_all
from pipelines.crawl.engine import ProgressHook
from pipelines.crawl.results import PART_ROWS, ShardLayoutError, host_report, iter_outcomes


class CrawlStage(Stage):
    """Inputs: ``{"candidates": <candidate Parquet file(s), a directory/prefix of them, or a glob>}``; output: the
    crawl directory (local or ``s3://``). ``rejected``: where the crawl's rejected rows go (default
    ``<output>/../rejected/crawl.parquet``). ``recrawl_failures=False`` is ``config.recrawl_rounds = 0``.
    ``progress``: called about twice a second with a :class:`~pipelines.crawl.engine.CrawlProgress`;
    ``log_file``: where img2dataset's and the workers' output goes (default: in the staging directory)."""

    name = "crawl"
    version = 2  # 2: politeness, robots.txt, deadline-bounded fetch, hashes in the crawl Parquet

    def __init__(self, config: CrawlConfig | Mapping[str, Any] | None, inputs: Mapping[str, Any], output: str, *,
                 rejected: str | None = None, beam_args: Sequence[str] = (), recrawl_failures: bool | None = None,
                 progress: ProgressHook | None = None, log_file: str | None = None):
        config = config if isinstance(config, CrawlConfig) else CrawlConfig.from_mapping(config or {}, "crawl")
        if recrawl_failures is False:
            config = config.replace(recrawl_rounds=0)
        output = str(output)
        super().__init__(config, inputs, output,
                         rejected=rejected or storage.join(storage.parent(output), "rejected", "crawl.parquet"),
                         beam_args=beam_args)
        if "candidates" not in self.inputs:
            from pipelines.core.errors import ConfigError

            raise ConfigError(f"crawl stage: inputs must name 'candidates', got {sorted(self.inputs)}")
        self.progress = progress
        self.log_file = log_file

    def input_files(self) -> list[str]:
        return candidate_files(self.inputs["candidates"])

    def compute(self, fingerprint: str) -> StageResult:
        config: CrawlConfig = self.config
        rounds = crawl_all(self.inputs["candidates"], self.output, config, progress=self.progress,
                           log_file=self.log_file)
        try:
            counts = self._write_rejected(rows_per_part=PART_ROWS)
        except ShardLayoutError:
            counts = self._write_rejected(rows_per_part=None)
        n_candidates, kept, reasons = counts
        shards = []
        for info in rounds:
            for i in info.done_shards:
                shards += [info.shard_uri(i, ".tar"), info.shard_uri(i, ".parquet"), info.shard_uri(i, "_stats.json")]
        report = host_report(self.output)
        return StageResult(
            stage="crawl", input_rows=n_candidates, kept=kept,
            rejected=dict(reasons), outputs={"shards": shards, "rejected": self.rejected},
            params=config.to_dict(), fingerprint=fingerprint,
            details={"rounds": report["rounds"], "hosts": report["hosts"], "n_hosts": report["n_hosts"],
                     "host_totals": report["totals"], "log_file": self.log_file})

    def _write_rejected(self, rows_per_part: int | None) -> tuple[int, int, Counter]:
        """The crawl's failures as the stage's rejected table, written part by part of the outcome (a crawl of any
        size is never held whole), published atomically; returns (candidates, successes, reasons)."""
        counts = [0, 0, Counter()]

        def fill(f) -> None:
            writer = None
            for part in iter_outcomes(self.output, rows_per_part=rows_per_part):
                rejected = part.rejected
                if writer is None:
                    writer = pq.ParquetWriter(f, rejected.schema, compression="zstd")
                writer.write_table(rejected)
                counts[0] += part.n_candidates
                counts[1] += part.successes.num_rows
                counts[2].update(part.reasons)
            writer.close()

        storage.write_stream_atomic(self.rejected, fill)
        return counts[0], counts[1], counts[2]

