"""Prefect flow ``build_dataset``: a short sequence of stages with one contract, then the manifest.

    curate -> crawl -> images -> decontam -> [clip_score] -> balance -> shard -> manifest.json

Each stage is a :class:`pipelines.core.stage.Stage` (typed config, input URIs, output URI, :class:`StageResult`).
The flow only wires their URIs together and runs them in order as Prefect tasks; resume comes from the stages'
markers (a stage whose fingerprint and files are unchanged is not recomputed; the crawl resumes per shard), so
rerunning the same command after a kill finishes with identical shards and counts. The manifest is written last
and its funnel is assembled from the stage results.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from flows.config import BuildConfig, load_build_config
from pipelines.core import storage
from pipelines.core.stage import Stage, StageResult, funnel

NETWORK_RETRIES = dict(retries=3, retry_delay_seconds=[2, 10, 30])

__all__ = ["BuildConfig", "build_dataset", "build_manifest", "load_build_config", "plan_stages"]


def _log(msg: str) -> None:
    try:
        get_run_logger().info(msg)
    except Exception:  # noqa: BLE001 - outside a run context (plain function call): print instead
        print(msg)


def crawl_log_file(cfg: BuildConfig) -> str:
    """Where img2dataset's and the crawl workers' output goes (a local file: under the work dir when it is local)."""
    import hashlib
    import tempfile

    work = cfg.work_dir()
    if storage.is_s3(work):
        path = Path(tempfile.gettempdir()) / "clipline-logs" / hashlib.sha256(work.encode()).hexdigest()[:16] / "crawl.log"
    else:
        path = Path(work) / "logs" / "crawl.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def plan_stages(cfg: BuildConfig, *, progress=None) -> list[Stage]:
    """The build's stages, in order, with every input and output URI fixed up front."""
    from pipelines.balance.stage import BalanceStage
    from pipelines.crawl.stage import CrawlStage
    from pipelines.curate.stage import CurateStage
    from pipelines.decontam.build import DecontamStage
    from pipelines.images.stage import ImagesStage
    from pipelines.shard.writer import ShardStage

    p, j = cfg.paths(), storage.join
    beam = cfg.beam_runner_args
    stages = [
        CurateStage(cfg.curate, {"raw": list(cfg.inputs), "querylist": cfg.querylist}, p["curate"],
                    rejected=p["rejected"], beam_args=beam, url_col=cfg.url_col, caption_col=cfg.caption_col,
                    columns=list(cfg.columns) if cfg.columns else None),
        CrawlStage(cfg.crawl, {"candidates": j(p["curate"], "candidates")}, p["crawl"],
                   rejected=j(p["rejected"], "crawl.parquet"), progress=progress, log_file=crawl_log_file(cfg)),
        ImagesStage(cfg.images, {"crawl": p["crawl"]}, p["pool"], rejected=j(p["rejected"], "images.parquet"),
                    beam_args=beam),
        DecontamStage(cfg.decontam, {"pool": p["pool"]}, p["decontam"], rejected=j(p["rejected"], "decontam.parquet"),
                      beam_args=beam),
    ]
    drops = [j(p["decontam"], "drop.parquet")]  # what the stages after the pool leave out, in order
    if cfg.clip_filter is not None:
        from clip_train.filter_stage import ClipScoreStage

        stages.append(ClipScoreStage(cfg.clip_filter, {"pool": p["pool"], "exclude": list(drops)}, p["clip_score"],
                                     rejected=j(p["rejected"], "clip_score.parquet"), beam_args=beam))
        drops.append(j(p["clip_score"], "drop.parquet"))
    stages += [
        BalanceStage(cfg.balance_config, {"pool": p["pool"], "exclude": drops}, p["balance"],
                     rejected=j(p["rejected"], "balance.parquet"), beam_args=beam),
        ShardStage(cfg.shard, {"pool": p["pool"], "kept": j(p["balance"], "kept.parquet")}, p["shards"],
                   beam_args=beam),
    ]
    if cfg.dataset is not None:  # a dataset version (flows/versions.py): crawl store + takedowns
        from pipelines.dataset.hooks import apply_hooks

        stages = apply_hooks(stages, cfg.dataset)
    return stages


@task(name="stage", cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: Stage) -> StageResult:
    result = stage.run()
    rejected = ", ".join(f"{k}: {v}" for k, v in sorted(result.rejected.items(), key=lambda kv: -kv[1])[:6])
    _log(f"{stage.name}: {result.input_rows} -> {result.kept}{' (reused)' if result.reused else ''}"
         f"{f'; rejected {rejected}' if rejected else ''}")
    return result


def build_manifest(cfg: BuildConfig, results: list[StageResult]) -> dict:
    """manifest.json's content, from the effective config and the stage results (validated when written)."""
    from pipelines.decontam.build import eval_set_fingerprint
    from pipelines.shard.writer import tool_versions

    by = {r.stage: r for r in results}
    curate, balance, shard = by["curate"], by["balance"], by["shard"]
    return {
        "lineage": {"inputs": curate.details["inputs"], "querylist": curate.details["querylist"],
                    "eval_sets": [eval_set_fingerprint(s) for s in cfg.decontam.eval_sets]},
        "params": cfg.to_dict(),
        "seed": cfg.shard.seed,
        "funnel": funnel(results),
        "stages": {r.stage: {"fingerprint": r.fingerprint, "params": r.params} for r in results},
        "curate": {"steps": curate.details["steps"], "balance": curate.details["balance"]},
        "crawl": {k: v for k, v in by["crawl"].details.items() if k != "log_file"},
        "decontam": by["decontam"].details,
        **({"clip_score": by["clip_score"].details} if "clip_score" in by else {}),
        "balance": {"t": balance.details["t"], "seed": balance.details["seed"],
                    "target_size": balance.details["target_size"], "input_rows": balance.input_rows,
                    "kept": balance.kept},
        "entry_counts": {"matched": _entry_counts(curate.outputs["entry_counts"]),
                         "before": balance.details["counts_before"], "after": balance.details["counts_after"]},
        "shards": [{k: s[k] for k in ("name", "n", "tar_sha256", "parquet_sha256")} for s in shard.details["shards"]],
        "samples_per_shard": cfg.shard.samples_per_shard,
        "tools": tool_versions(),
    }


def _entry_counts(uri: str) -> dict[str, int]:
    """{entry_id: pairs} of an entry-counts Parquet (entries with a match only)."""
    t = storage.read_table(uri)
    return {str(int(e)): int(c) for e, c in zip(t.column("entry_id").to_pylist(), t.column("count").to_pylist()) if c}


@task(name="write_manifest", cache_policy=NO_CACHE, persist_result=False)
def manifest_task(cfg: BuildConfig, results: list[StageResult]) -> dict:
    from pipelines.shard.writer import write_manifest

    uri = cfg.paths()["manifest"]
    doc = write_manifest(uri, build_manifest(cfg, results))  # validates: the funnel must add up
    return {"manifest": uri, "funnel": doc["funnel"], "n_shards": len(doc["shards"])}


@flow(name="build_dataset", log_prints=True)
def build_dataset(cfg: BuildConfig, verbose: bool = False) -> dict:
    """Raw URL lists -> balanced, decontaminated webdataset + Parquet shards with a manifest."""
    from flows.progress import CrawlProgressDisplay, LogTail

    started = time.time()
    results: list[StageResult] = []
    display = CrawlProgressDisplay(log=_log)
    _log(f"crawl log (img2dataset and worker output): {crawl_log_file(cfg)}")
    try:
        for stage in plan_stages(cfg, progress=display):
            options = NETWORK_RETRIES if stage.name in ("crawl", "shard") else {}
            run = run_stage.with_options(name=stage.name, **options)
            if verbose and stage.name == "crawl":
                with LogTail(crawl_log_file(cfg)):
                    results.append(run(stage))
            else:
                results.append(run(stage))
    finally:
        display.close()
    summary = manifest_task(cfg, results)
    summary["elapsed_s"] = round(time.time() - started, 1)
    summary["shards_dir"] = cfg.paths()["shards"]
    summary["reused"] = [r.stage for r in results if r.reused]
    return summary
