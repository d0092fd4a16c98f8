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

The names below are loaded on first use: a crawl worker process that imports ``pipelines.crawl.worker`` does not
import the driver, the stage or the outcome reader (a tenth of a second of CPU at every worker's start).
"""
from pipelines.core.lazy import lazy_exports

_MODULES = {
    "pipelines.crawl.config": ("CrawlConfig",),
    "pipelines.crawl.driver": ("crawl", "crawl_all", "crawl_shard_files", "list_rounds", "read_candidates",
                               "recrawl_failures"),
    "pipelines.crawl.engine": ("CrawlProgress",),
    "pipelines.crawl.reasons": ("REASONS", "RETRYABLE_REASONS", "normalise_reason"),
    "pipelines.crawl.results": ("CrawlOutcome", "crawl_outcome", "host_report", "successful_records"),
    "pipelines.crawl.rounds": ("CrawlError", "CrawlIncompleteError", "RoundInfo"),
    "pipelines.crawl.ssrf": ("AddressPolicy", "FetchRefused", "build_guarded_opener"),
    "pipelines.crawl.stage": ("CrawlStage",),
}
__all__ = sorted(name for names in _MODULES.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())
