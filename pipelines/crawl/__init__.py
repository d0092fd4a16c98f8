"""The crawl stage: img2dataset as the engine, behind an SSRF guard, polite per host, resumable, with re-crawls.

    result = CrawlStage(config, {"candidates": "BUILD/curate/candidates/"}, "BUILD/crawl",
                        rejected="BUILD/rejected/crawl.parquet", progress=hook).run()
    crawl_all("BUILD/curate/candidates/", "BUILD/crawl", config)   # the same without the stage contract
    outcome = crawl_outcome("BUILD/crawl")                         # successes (uid -> tar member) + failures
    records = successful_records("BUILD/crawl")                    # what the images stage needs

Importing this package does not import img2dataset; only running a crawl does. img2dataset starts its workers
with multiprocessing's *spawn* method, which re-imports the calling program's main module in each worker: a script
that crawls must keep its work under ``if __name__ == "__main__":`` (CLIs with entry points and pytest are fine).
Crawling from a worker thread (a Prefect task) is supported.
"""
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.crawl import (
    crawl,
    crawl_all,
    crawl_shard_files,
    list_rounds,
    read_candidates,
    recrawl_failures,
)
from pipelines.crawl.engine import CrawlProgress
from pipelines.crawl.reasons import REASONS, RETRYABLE_REASONS, normalise_reason
from pipelines.crawl.results import CrawlOutcome, crawl_outcome, host_report, successful_records
from pipelines.crawl.rounds import CrawlError, CrawlIncompleteError, RoundInfo
from pipelines.crawl.ssrf import AddressPolicy, FetchRefused, build_guarded_opener
from pipelines.crawl.stage import CrawlStage

__all__ = [
    "AddressPolicy",
    "CrawlConfig",
    "CrawlError",
    "CrawlIncompleteError",
    "CrawlOutcome",
    "CrawlProgress",
    "CrawlStage",
    "FetchRefused",
    "REASONS",
    "RETRYABLE_REASONS",
    "RoundInfo",
    "build_guarded_opener",
    "crawl",
    "crawl_all",
    "crawl_outcome",
    "crawl_shard_files",
    "host_report",
    "list_rounds",
    "normalise_reason",
    "read_candidates",
    "recrawl_failures",
    "successful_records",
]
