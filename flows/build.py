"""Prefect flow ``build_dataset``: curate -> crawl -> image checks -> decontaminate -> rebalance -> shard -> manifest.

Each task calls one stage of ``pipelines/`` and passes references (paths/URIs and small stats), never bulk data.
Resume comes from the stages themselves: each writes its units atomically and a completion marker last
(curate: ``stats.json``; crawl: img2dataset's incremental mode; images/balance: markers; shards: one marker per
shard), so rerunning the same command after a kill skips finished work and ends with identical shards and counts.
Network-facing tasks retry with backoff; task results are persisted by Prefect.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task

from pipelines.core import storage
from pipelines.curate.steps import CurateParams

NETWORK_RETRIES = dict(retries=3, retry_delay_seconds=[2, 10, 30])


@dataclass
class BuildConfig:
    """Everything that shapes a dataset build (saved in the manifest)."""

    inputs: list[str]
    querylist: str
    out: str
    url_col: str = "url"
    caption_col: str = "caption"
    columns: list[str] | None = None
    curate: CurateParams = field(default_factory=CurateParams)
    crawl: dict = field(default_factory=dict)  # pipelines.crawl.CrawlConfig fields
    images: dict = field(default_factory=dict)  # pipelines.images.stage.ImagesConfig fields
    eval_sets: list[str] = field(default_factory=list)
    decontam: dict = field(default_factory=dict)  # pipelines.decontam.detector.DetectorConfig fields
    t: float | None = None  # second balancing pass; default: the curation t
    target_size: int | None = None
    samples_per_shard: int = 1000
    seed: int = 0
    recrawl_failures: bool = True
    beam_args: list[str] = field(default_factory=list)
    work: str | None = None  # intermediate stages; default: OUT itself, or a local dir when OUT is s3://

    def work_dir(self) -> str:
        """Where curate/crawl/pool/decontam/balance live. img2dataset and the pool read crawl tars from a local
        disk, so an s3:// build keeps its intermediates in a local work dir and publishes shards, rejected rows
        and the manifest to OUT."""
        if self.work:
            return self.work
        if storage.is_s3(self.out):
            import hashlib

            return str(Path(".clipline-work") / hashlib.sha256(self.out.encode()).hexdigest()[:16])
        return self.out

    def paths(self) -> dict[str, str]:
        j = storage.join
        work = self.work_dir()
        return {**{k: j(work, k) for k in ("curate", "crawl", "pool", "decontam", "balance")},
                **{k: j(self.out, k) for k in ("shards", "rejected")}}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["curate"]["langs"] = list(self.curate.langs)
        return d


def _log(msg: str) -> None:
    try:
        get_run_logger().info(msg)
    except Exception:  # noqa: BLE001 - outside a run context (plain function call): print instead
        print(msg)


@task(name="curate", persist_result=True)
def curate_task(cfg: BuildConfig) -> dict:
    from pipelines.curate.stage import run_curate

    p = cfg.paths()
    stats = run_curate(cfg.inputs, cfg.querylist, p["curate"], cfg.curate, url_col=cfg.url_col,
                       caption_col=cfg.caption_col, columns=cfg.columns, beam_args=cfg.beam_args,
                       rejected_out=p["rejected"])
    _log(f"curate: {stats['input_rows']} rows -> {stats['kept']} candidates ({stats['rejected']})")
    return {k: stats[k] for k in ("input_rows", "kept", "rejected", "steps", "balance", "inputs", "querylist")}


@task(name="crawl", persist_result=True, **NETWORK_RETRIES)
def crawl_task(cfg: BuildConfig) -> dict:
    from pipelines.crawl import CrawlConfig, crawl, recrawl_failures

    p = cfg.paths()
    config = CrawlConfig(**cfg.crawl)
    info = crawl(storage.join(p["curate"], "candidates"), p["crawl"], config)
    if cfg.recrawl_failures:
        recrawl_failures(p["crawl"], config)
    _log(f"crawl: {info}")
    return {"crawl_dir": p["crawl"], "config": dataclasses.asdict(config)}


@task(name="process_images", persist_result=True)
def images_task(cfg: BuildConfig) -> dict:
    from pipelines.images.stage import process_images

    p = cfg.paths()
    stats = process_images(p["crawl"], p["pool"], cfg.images, rejected_uri=storage.join(p["rejected"], "images.parquet"),
                           pipeline_args=cfg.beam_args)
    _log(f"images: {stats['input_rows']} crawled rows -> {stats['kept']} ok ({stats['rejected']})")
    return stats


@task(name="decontaminate", persist_result=True)
def decontam_task(cfg: BuildConfig) -> dict:
    """Drop pool samples that match any registered evaluation set; writes decontam/matches.parquet and the
    rejected rows (stage ``decontam``)."""
    from pipelines.decontam.build import decontaminate_build

    p = cfg.paths()
    result = decontaminate_build(p["pool"], cfg.eval_sets, p["decontam"],
                                 rejected_uri=storage.join(p["rejected"], "decontam.parquet"), detector=cfg.decontam)
    _log(f"decontaminate: {result['n_dropped']} pool samples match {len(cfg.eval_sets)} evaluation set(s)")
    return result


@task(name="rebalance", persist_result=True)
def rebalance_task(cfg: BuildConfig, exclude: list[str]) -> dict:
    from pipelines.images.stage import rebalance

    p = cfg.paths()
    t = cfg.t if cfg.t is not None else (None if cfg.target_size else (cfg.curate.t or 20_000))
    result = rebalance(p["pool"], p["balance"], t=t, target_size=cfg.target_size, seed=cfg.seed, exclude=exclude,
                       rejected_uri=storage.join(p["rejected"], "balance.parquet"), pipeline_args=cfg.beam_args)
    _log(f"rebalance: {result['input_rows']} -> {result['kept']} (t = {result['t']})")
    return result


@task(name="write_shards", persist_result=True, **NETWORK_RETRIES)
def shard_task(cfg: BuildConfig, kept_uri: str) -> list[dict]:
    from pipelines.shard.writer import write_shards

    p = cfg.paths()
    shards = write_shards(p["pool"], kept_uri, p["shards"], cfg.samples_per_shard, cfg.seed,
                          pipeline_args=cfg.beam_args)
    _log(f"shards: {len(shards)} written to {p['shards']}")
    return shards


def rejected_counts(rejected_dir: str) -> dict[str, dict[str, int]]:
    """Rows per stage and reason over every rejected/*.parquet of a build."""
    out: dict[str, dict[str, int]] = {}
    for uri in storage.list_prefix(rejected_dir) if (storage.is_s3(rejected_dir) or storage.exists(rejected_dir)) \
            else []:
        if not uri.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["stage", "reason"])
        for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()):
            out.setdefault(stage, {}).setdefault(reason, 0)
            out[stage][reason] += 1
    return {s: dict(sorted(r.items())) for s, r in sorted(out.items())}


@task(name="write_manifest", persist_result=True)
def manifest_task(cfg: BuildConfig, curate: dict, images: dict, decontam: dict, balance: dict,
                  shards: list[dict]) -> dict:
    from pipelines.core import storage as st
    from pipelines.shard.writer import tool_versions, write_manifest

    p = cfg.paths()
    rejected = rejected_counts(p["rejected"])
    flat_rejected = {f"{stage}:{reason}": n for stage, reasons in rejected.items() for reason, n in reasons.items()}
    n_shard_rows = sum(s["n"] for s in shards)
    stages = {
        "curate": {"in": curate["input_rows"], "out": curate["kept"]},
        "crawl_and_images": {"in": images["input_rows"], "out": images["kept"]},
        "decontam": {"in": decontam["pool_ok"], "out": decontam["pool_ok"] - decontam["n_dropped"]},
        "balance": {"in": balance["input_rows"], "out": balance["kept"]},
        "shard": {"in": balance["kept"], "out": n_shard_rows},
    }
    funnel = {"input_rows": curate["input_rows"], "kept": n_shard_rows, "stages": stages, "rejected": flat_rejected}
    manifest = {
        "lineage": {"inputs": curate["inputs"], "querylist": curate["querylist"]},
        "params": cfg.to_dict(),
        "seed": cfg.seed,
        "funnel": funnel,
        "curate": {"steps": curate["steps"], "balance": curate["balance"]},
        "decontam": decontam,
        "balance": {k: balance[k] for k in ("t", "seed", "target_size", "input_rows", "kept")},
        "entry_counts": {"before": balance["counts_before"], "after": balance["counts_after"]},
        "shards": [{k: s[k] for k in ("name", "n", "tar_sha256", "parquet_sha256")} for s in shards],
        "samples_per_shard": cfg.samples_per_shard,
        "tools": tool_versions(),
    }
    write_manifest(st.join(cfg.out, "manifest.json"), manifest)  # validates: the funnel must add up
    return {"manifest": st.join(cfg.out, "manifest.json"), "funnel": funnel, "n_shards": len(shards)}


@flow(name="build_dataset", persist_result=True, log_prints=True)
def build_dataset(cfg: BuildConfig) -> dict:
    """Raw URL lists -> balanced, decontaminated webdataset + Parquet shards with a manifest."""
    started = time.time()
    curate = curate_task(cfg)
    crawl_task(cfg)
    images = images_task(cfg)
    decontam = decontam_task(cfg)
    balance = rebalance_task(cfg, [decontam["drop_uri"]] if decontam.get("drop_uri") else [])
    shards = shard_task(cfg, balance["kept_uri"])
    summary = manifest_task(cfg, curate, images, decontam, balance, shards)
    summary["elapsed_s"] = round(time.time() - started, 1)
    summary["shards_dir"] = cfg.paths()["shards"]
    return summary


def load_build_config(path: str | os.PathLike) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}
