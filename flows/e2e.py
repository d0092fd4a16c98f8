"""Prefect flow ``end_to_end``: build -> train -> evaluate -> audit -> report, from one configuration.

It lives apart from flows/train.py (training and evaluation flows) and flows/audit.py (the audit flow) and uses
both, so neither of those imports the other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from prefect import flow

from flows.audit import audit_task
from flows.train import evaluate_task, train_task
from pipelines.core import storage
from pipelines.core.errors import ConfigError

@dataclass
class EndToEndConfig:
    """One YAML file configures the whole run (see infra/e2e.example.yaml)."""

    out: str
    build: dict  # flows.build.BuildConfig fields (inputs, querylist, eval_sets, crawl, curate, ...)
    train: dict = field(default_factory=dict)  # model, and trainer options (steps, batch_size, lr, ...)
    evaluate: dict = field(default_factory=dict)  # eval_sets (default: the build's), linear_probe, retrieval
    audit: dict = field(default_factory=dict)  # dataset (default: the shards), eval_sets (default: build's), thresholds
    train_deployment: str | None = None  # e.g. "train_model/gpu": run training through a (GPU) work pool

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "EndToEndConfig":
        import yaml

        data = yaml.safe_load(storage.read_bytes(str(path)).decode()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of {sorted(cls.__dataclass_fields__)}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def build_config_from(e2e: EndToEndConfig):
    """The build's BuildConfig, through the one config path (flows.config.load_build_config); OUT defaults to
    E2E_OUT/build."""
    from flows.config import load_build_config

    b = dict(e2e.build)
    b.setdefault("out", storage.join(e2e.out, "build"))
    return load_build_config(b)


def _build_eval_sets(bcfg) -> list[str]:
    """The evaluation sets the build decontaminated against: the default for evaluation and audit."""
    return list(bcfg.decontam.eval_sets)


@flow(name="end_to_end", persist_result=True, log_prints=True)
def end_to_end(config: dict) -> dict:
    """build -> train -> evaluate -> audit -> report, from one configuration (a dict of EndToEndConfig fields).

    The audit runs once, after training, so that it can report the CLIP paper's All / Clean / Overlap zero-shot
    statistics with the trained checkpoint next to the overlap table (the build has already decontaminated).
    """
    from prefect.artifacts import create_markdown_artifact

    from flows.build import build_dataset
    from flows.report import markdown_tables, render_report

    e2e = EndToEndConfig(**config)
    out = e2e.out
    bcfg = build_config_from(e2e)
    build = build_dataset(bcfg)
    shards = build["shards_dir"]

    audit_sets = e2e.audit.get("eval_sets") or _build_eval_sets(bcfg)
    audit_dir = storage.join(out, "audit")

    train_opts = dict(e2e.train)
    model = train_opts.pop("model", "tiny")
    run_dir = storage.join(out, "run")
    if e2e.train_deployment:
        from prefect.deployments import run_deployment

        run_deployment(e2e.train_deployment, parameters={"shards": shards, "model": model, "run_dir": run_dir,
                                                         "options": train_opts})
    else:
        train_task(shards, model, run_dir, train_opts)

    eval_sets = e2e.evaluate.get("eval_sets") or _build_eval_sets(bcfg)
    eval_dir = storage.join(out, "eval")
    evaluation = evaluate_task(run_dir, eval_sets, eval_dir, bool(e2e.evaluate.get("linear_probe")),
                               e2e.evaluate.get("retrieval"), e2e.evaluate.get("extra"))
    if audit_sets:  # after training: the paper's All / Clean / Overlap statistics need the trained model
        # Default: the published shards. The demo audits the crawled pool instead, to show what
        # decontamination removed (and that the model does no better on the images whose copies were removed).
        audit_task(e2e.audit.get("dataset") or shards, audit_sets, audit_dir, run_dir, e2e.audit.get("thresholds"))

    report = render_report(storage.join(out, "report.html"), build_dir=bcfg.out, audit_dir=audit_dir if audit_sets else None,
                           run_dir=run_dir, eval_dir=eval_dir, title=f"clipline end-to-end run: {out}")
    for key, md in markdown_tables(build_dir=bcfg.out, audit_dir=audit_dir if audit_sets else None,
                                   eval_dir=eval_dir).items():
        create_markdown_artifact(key=key.replace("_", "-"), markdown=md, description=key)
    return {"report": report, "build": build, "evaluation": evaluation, "run_dir": run_dir}
