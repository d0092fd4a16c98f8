"""The crawl stage: img2dataset as the engine, behind an SSRF guard, polite per host, resumable, with re-crawls.

    result = CrawlStage(config, {"candidates": "BUILD/curate/candidates/"}, "BUILD/crawl",
                        rejected="BUILD/rejected/crawl.parquet", progress=hook).run()
    crawl_all("BUILD/curate/candidates/", "BUILD/crawl", config)   # the same without the stage contract
    outcome = crawl_outcome("BUILD/crawl")                         # successes (uid -> tar member) + failures
    records = successful_records("BUILD/crawl")                    # what the images stage needs

Importing this package imports nothing else: each name below is loaded on first use (an image helper process
imports only what resizing and hashing need). Only running a crawl imports img2dataset. img2dataset starts its workers
with multiprocessing's *spawn* method, which re-imports the calling program's main module in each worker: a script
that crawls must keep its work under ``if __name__ == "__main__":`` (CLIs with entry points and pytest are fine).
Crawling from a worker thread (a Prefect task) is supported.
"""

import importlib

_EXPORTS = {
    "CrawlConfig": "pipelines.crawl.config",
    "crawl": "pipelines.crawl.crawl",
    "crawl_all": "pipelines.crawl.crawl",
    "crawl_shard_files": "pipelines.crawl.crawl",
    "list_rounds": "pipelines.crawl.crawl",
    "read_candidates": "pipelines.crawl.crawl",
    "recrawl_failures": "pipelines.crawl.crawl",
    "CrawlProgress": "pipelines.crawl.engine",
    "REASONS": "pipelines.crawl.reasons",
    "RETRYABLE_REASONS": "pipelines.crawl.reasons",
    "normalise_reason": "pipelines.crawl.reasons",
    "CrawlOutcome": "pipelines.crawl.results",
    "crawl_outcome": "pipelines.crawl.results",
    "host_report": "pipelines.crawl.results",
    "successful_records": "pipelines.crawl.results",
    "CrawlError": "pipelines.crawl.rounds",
    "CrawlIncompleteError": "pipelines.crawl.rounds",
    "RoundInfo": "pipelines.crawl.rounds",
    "AddressPolicy": "pipelines.crawl.ssrf",
    "FetchRefused": "pipelines.crawl.ssrf",
    "build_guarded_opener": "pipelines.crawl.ssrf",
    "CrawlStage": "pipelines.crawl.stage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines.crawl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
