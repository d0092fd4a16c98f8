"""The build's configuration: one typed config per stage, read one way from YAML / mappings / CLI flags.

Precedence: dataclass defaults < the YAML file (``--config``) < flags given on the command line. Every level
rejects unknown keys with their path (``crawl.timout: unknown key``) and every stage config validates its values
in ``__post_init__``, so a typo or a bad number fails before any work. The effective config is saved in the
manifest (``params``). Deployments, ``end_to_end`` and the CLI all go through :func:`load_build_config`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.balance.stage import BalanceConfig
from clip_train.filter_stage import ClipScoreConfig
from pipelines.core import storage
from pipelines.core.beam import resolve_runner
from pipelines.core.config import Config, check, merge
from pipelines.core.errors import ConfigError
from pipelines.crawl.config import CrawlConfig
from pipelines.curate.steps import CurateParams
from pipelines.decontam.build import DecontamConfig
from pipelines.images.stage import ImagesConfig
from pipelines.dataset.hooks import DatasetHooks
from pipelines.shard.writer import ShardConfig

STAGE_DIRS = ("curate", "crawl", "pool", "decontam", "clip_score", "balance")


@dataclass(frozen=True)
class BuildConfig(Config):
    """Everything that shapes a dataset build (saved in the manifest)."""

    inputs: tuple[str, ...]
    querylist: str
    out: str
    work: str | None = None  # where intermediate stages live; default: OUT itself (local or s3://)
    url_col: str = "url"
    caption_col: str = "caption"
    columns: tuple[str, ...] | None = None  # names of header-less CSV/TSV columns
    runner: str = "direct"  # Beam runner: direct, dask, dataflow, flink, spark (or a class path)
    beam_args: tuple[str, ...] = ()
    curate: CurateParams = field(default_factory=CurateParams)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)  # t unset: the curation t
    shard: ShardConfig = field(default_factory=ShardConfig)
    clip_filter: ClipScoreConfig | None = None  # CLIP-score filtering after decontamination (off by default)
    dataset: DatasetHooks | None = None  # set by flows.versions.build_version: crawl store, takedowns, as_of

    def __post_init__(self):
        object.__setattr__(self, "inputs", (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs))
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "beam_args", tuple(self.beam_args or ()))
        check(len(self.inputs) > 0, "inputs", "expected at least one input file, glob or directory")
        check(bool(self.querylist), "querylist", "expected a query list URI")
        check(bool(self.out), "out", "expected an output directory or s3:// prefix")
        resolve_runner(self.runner)  # an unknown runner fails here, with the names that work

    # -- derived
    @property
    def balance_config(self) -> BalanceConfig:
        """The second balancing pass: its own t/target_size when given, else the curation t."""
        b = self.balance
        if b.t is None and b.target_size is None:
            t = self.curate.t if self.curate.target_size is None and self.curate.t else 20_000
            return b.replace(t=float(t))
        return b

    @property
    def beam_runner_args(self) -> list[str]:
        return [f"--runner={resolve_runner(self.runner)}", *self.beam_args]

    def work_dir(self) -> str:
        return self.work or self.out

    def paths(self) -> dict[str, str]:
        j, work = storage.join, self.work_dir()
        return {**{k: j(work, k) for k in STAGE_DIRS}, **{k: j(self.out, k) for k in ("shards", "rejected")},
                "manifest": j(self.out, "manifest.json")}

    def fingerprint(self) -> str:
        from pipelines.core.markers import fingerprint

        return fingerprint(self.to_dict())

    def short_id(self) -> str:
        return hashlib.sha256(self.fingerprint().encode()).hexdigest()[:12]


def read_yaml(path: str | Path) -> dict:
    import yaml

    try:
        text = storage.read_bytes(str(path)).decode()
    except storage.StorageError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of BuildConfig fields, got {type(data).__name__}")
    return data


def load_build_config(source: str | Path | Mapping[str, Any] | None = None,
                      overrides: Mapping[str, Any] | None = None) -> BuildConfig:
    """defaults < ``source`` (a YAML path or a mapping) < ``overrides`` (e.g. flags given on the command line)."""
    base = read_yaml(source) if isinstance(source, (str, Path)) else dict(source or {})
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    try:
        return BuildConfig.from_mapping(merge(base, overrides or {}))
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
