"""How a dataset-version build differs from a plain build: the crawl stage goes through the root's crawl store and
leaves out its takedowns. Everything else (curate, images, decontam, balance, shard, the manifest) is the plain
build's, with every stage's ``work`` under ``ROOT/work`` so unchanged stages are reused from one version to the next,
and decontamination matches only images no earlier version matched under the same evaluation sets and detector.

    hooks = DatasetHooks(root="ROOT", as_of="2025-03-01T00:00:00Z")
    stages = apply_hooks(plan_stages(cfg), hooks)    # the crawl stage replaced by a StoreCrawlStage

"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.core import storage
from pipelines.core.config import Config, check
from pipelines.dataset.crawl_store import BackoffPolicy, format_time, parse_time


@dataclass(frozen=True)
class DatasetHooks(Config):
    """root: the dataset root; as_of: the build's clock (ISO 8601, UTC); backoff: the crawl store's retry policy."""

    root: str
    as_of: str
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)

    def __post_init__(self):
        check(bool(self.root), "dataset.root", "expected a dataset root (local path or s3:// prefix)")
        from pipelines.core.errors import ClipError

        try:
            object.__setattr__(self, "as_of", format_time(parse_time(self.as_of)))
        except ClipError as exc:
            from pipelines.core.errors import ConfigError

            raise ConfigError(f"dataset.as_of: {exc}") from None

    @property
    def crawl_store(self) -> str:
        return storage.join(self.root, "crawl_store")

    @property
    def takedowns(self) -> str:
        return storage.join(self.root, "takedowns")

    @property
    def decontam_cache(self) -> str:
        return storage.join(self.root, "decontam_cache")

    @property
    def curate_cache(self) -> str:
        return storage.join(self.root, "curate_cache")

    @property
    def fetch_dir(self) -> str:
        return storage.join(self.root, "work", "fetch")


def apply_hooks(stages: list, hooks: DatasetHooks) -> list:
    """The plain build's stages with the crawl stage replaced by a :class:`StoreCrawlStage` (same inputs, output,
    rejected file and crawl config) and the decontamination stage given the root's per-image cache
    (:mod:`pipelines.decontam.cache`)."""
    from pipelines.dataset.store_crawl import StoreCrawlStage

    out = []
    for stage in stages:
        if stage.name == "crawl" and not isinstance(stage, StoreCrawlStage):
            stage = StoreCrawlStage(stage.config, stage.inputs, stage.output, rejected=stage.rejected,
                                    store=hooks.crawl_store, as_of=hooks.as_of, takedowns=hooks.takedowns,
                                    backoff=hooks.backoff, fetch_dir=hooks.fetch_dir, beam_args=stage.beam_args,
                                    progress=getattr(stage, "progress", None),
                                    log_file=getattr(stage, "log_file", None))
        elif stage.name == "decontam":  # images matched by an earlier version are not matched again
            stage.cache = hooks.decontam_cache
        elif stage.name == "curate":  # input files curated by an earlier version are not read again
            stage.file_cache = hooks.curate_cache
        out.append(stage)
    return out
