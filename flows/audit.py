"""Prefect flow ``audit_contamination``: a scheduled contamination audit of any dataset against evaluation sets.

Wraps :func:`pipelines.decontam.audit.run_audit` (report.json + report.html) and publishes the overlap table as
a Prefect Markdown artifact. With a checkpoint, the zero-shot predictions the CLIP section 5 statistics need are
computed here (flows may import ``clip_train``; the data plane in ``pipelines/`` never does) and passed in.
:func:`main` is the ``clipline audit`` command line.
"""
from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task


def zeroshot_predict(checkpoint: str, eval_set) -> list[tuple]:
    """(eval_id, predicted label, true label) per example of ``eval_set`` with the model in ``checkpoint``."""
    from clip_train.evaluate import zeroshot_predictions  # noqa: PLC0415 - torch only when a checkpoint is audited

    return zeroshot_predictions(checkpoint, eval_set)


def main(argv: list[str] | None = None) -> int:
    """``clipline audit``: the data-plane CLI with zero-shot predictions for ``--checkpoint``."""
    from pipelines.decontam.audit import main as audit_main  # noqa: PLC0415

    return audit_main(argv, predict=zeroshot_predict)


@task(name="audit", persist_result=True)
def audit_task(dataset: str, eval_sets: list[str], out: str, checkpoint: str | None = None,
               thresholds: dict | None = None) -> dict:
    import json
    from pathlib import Path

    from clip_train.reuse import done_before, fingerprint, mark_done
    from pipelines.decontam.audit import run_audit
    from pipelines.decontam.descriptor import DEFAULT_WEIGHTS, weights_fingerprint_of

    # A rerun with the same shards, evaluation sets, checkpoint and thresholds reuses the finished report.
    # (Only for a local shard directory, whose sizes.json changes whenever its shards do.)
    shard_sizes = Path(dataset) / "sizes.json"
    local = shard_sizes.exists() and not out.startswith("s3://")
    fp = fingerprint(shard_sizes, list(eval_sets), Path(checkpoint) / "checkpoint.pt" if checkpoint else None,
                     thresholds or {}, weights_fingerprint_of(DEFAULT_WEIGHTS))
    marker = Path(out) / ".done"
    if local and done_before(marker, fp) and (Path(out) / "report.json").exists():
        report = json.loads((Path(out) / "report.json").read_text())
    else:
        predictions = (lambda es: zeroshot_predict(checkpoint, es)) if checkpoint else None
        report = run_audit(dataset, list(eval_sets), out, checkpoint, predictions=predictions, **(thresholds or {}))
        if local:
            mark_done(marker, fp)
    return {"out": out, "report_json": f"{out}/report.json", "report_html": f"{out}/report.html",
            "eval_sets": {name: {k: r[k] for k in ("n_eval", "n_overlap", "overlap_rate")}
                          for name, r in report["eval_sets"].items()},
            "statistics": report.get("statistics")}


def overlap_markdown(summary: dict) -> str:
    lines = ["| evaluation set | examples | with a near-duplicate | overlap |", "|---|---:|---:|---:|"]
    for name, r in summary["eval_sets"].items():
        lines.append(f"| {name} | {r['n_eval']:,} | {r['n_overlap']:,} | {100 * r['overlap_rate']:.2f}% |")
    for name, s in (summary.get("statistics") or {}).items():
        lines.append(f"\n**{name}** zero-shot: All {s.get('all', {}).get('accuracy')}, "
                     f"Clean {s.get('clean', {}).get('accuracy')}, p = {s.get('p_value')}")
    return "\n".join(lines)


@flow(name="audit_contamination", persist_result=True, log_prints=True)
def audit_contamination(dataset: str, eval_sets: list[str], out: str, checkpoint: str | None = None,
                        thresholds: dict | None = None) -> dict:
    """Audit DATASET (shards, tar glob, folder:PATH, parquet, or an eval-set spec) for overlap with EVAL_SETS."""
    from prefect.artifacts import create_markdown_artifact

    summary = audit_task(dataset, eval_sets, out, checkpoint, thresholds)
    create_markdown_artifact(key="contamination", markdown=overlap_markdown(summary),
                             description=f"contamination audit of {dataset}")
    get_run_logger().info(f"audit report: {summary['report_html']}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
