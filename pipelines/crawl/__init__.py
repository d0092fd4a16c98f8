"""The crawl stage: img2dataset as a library behind an SSRF guard, resumable, with re-crawls of failures.

    info = crawl("BUILD/curate/candidates/", "BUILD/crawl", CrawlConfig(allow_cidrs=("127.0.0.1/32",)))
    recrawl_failures("BUILD/crawl", config, round_no=1)        # optional: retry transient failures once
    outcome = crawl_outcome("BUILD/crawl")                     # successes (uid -> tar member) + rejected rows

Importing this package does not import img2dataset; only running a crawl does. img2dataset starts its workers
with multiprocessing's *spawn* method, which re-imports the calling program's main module in each worker: a script
that crawls must keep its work under ``if __name__ == "__main__":`` (CLIs with entry points and pytest are fine).
Crawling from a worker thread (a Prefect task) is supported.
"""
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.crawl import (
    CrawlError,
    CrawlIncompleteError,
    RoundInfo,
    crawl,
    crawl_shard_files,
    list_rounds,
    read_candidates,
    recrawl_failures,
)
from pipelines.crawl.reasons import REASONS, RETRYABLE_REASONS, normalise_reason
from pipelines.crawl.results import CrawlOutcome, crawl_outcome
from pipelines.crawl.ssrf import AddressPolicy, FetchRefused, build_guarded_opener

__all__ = [
    "AddressPolicy",
    "CrawlConfig",
    "CrawlError",
    "CrawlIncompleteError",
    "CrawlOutcome",
    "FetchRefused",
    "REASONS",
    "RETRYABLE_REASONS",
    "RoundInfo",
    "build_guarded_opener",
    "crawl",
    "crawl_outcome",
    "crawl_shard_files",
    "list_rounds",
    "normalise_reason",
    "read_candidates",
    "recrawl_failures",
]
