"""The crawl as a build stage: candidates -> img2dataset shards (round 0 and re-crawls of retryable failures),
plus every failed row as a rejected row (stage ``crawl``).

The crawl resumes per shard (img2dataset's ``_stats.json`` per finished shard), so an interrupted stage rerun
downloads only unfinished shards; the stage marker is written when every round is complete.
"""
from __future__ import annotations

from collections import Counter

from pipelines.core import storage
from pipelines.core.stage import Stage, StageResult
from pipelines.crawl.config import CrawlConfig


class CrawlStage(Stage):
    """inputs: ``{"candidates": DIR_OR_FILES}``; output: the crawl directory; ``rejected``: one Parquet file."""

    name = "crawl"

    def __init__(self, config: CrawlConfig | None, inputs, output: str, *, rejected: str | None = None,
                 recrawl_failures: bool = True, beam_args=()):
        super().__init__(config or CrawlConfig(), inputs, output,
                         rejected=rejected or storage.join(storage.parent(output), "rejected", "crawl.parquet"),
                         beam_args=beam_args)
        self.recrawl = recrawl_failures

    def candidate_files(self) -> list[str]:
        src = self.inputs["candidates"]
        if isinstance(src, (list, tuple)):
            return list(src)
        return sorted(u for u in storage.list_prefix(src) if u.endswith(".parquet"))

    def input_files(self) -> list[str]:
        return self.candidate_files()

    def params(self) -> dict:
        return {**self.config.to_dict(), "recrawl_failures": self.recrawl}

    def compute(self, fingerprint: str) -> StageResult:
        from pipelines.crawl.crawl import crawl, read_candidates, recrawl_failures
        from pipelines.crawl.results import crawl_outcome

        n_candidates = read_candidates(self.candidate_files()).num_rows
        crawl(self.candidate_files(), self.output, self.config)
        if self.recrawl:
            recrawl_failures(self.output, self.config)
        outcome = crawl_outcome(self.output)
        storage.write_table(self.rejected, outcome.rejected.sort_by("uid"))
        failed = Counter(outcome.failures.column("reason").to_pylist())
        from pipelines.images.crawl_reader import crawl_shards

        shards = [f for pair in crawl_shards(self.output) for f in pair]
        return StageResult(stage="crawl", input_rows=n_candidates, kept=outcome.successes.num_rows,
                           rejected=dict(failed), outputs={"shards": shards, "rejected": self.rejected},
                           params=self.params(), fingerprint=fingerprint,
                           details={"rounds": len({r for r in outcome.successes.column("round").to_pylist()}
                                                  | {0})})
