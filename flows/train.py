"""Prefect flows downstream of a build: ``train_model``, ``evaluate_model`` and ``end_to_end``.

Training and evaluation run as subprocesses of the flow (``python -m clip_train.train`` / ``torchrun`` when several
GPUs are visible), so the flow process never holds a model and the same flow can run on a GPU work pool
(infra/prefect/README.md). Flows pass URIs (shard patterns, run directories), never data. A rerun after a crash
continues: the build skips finished units, training resumes from its last checkpoint (``--resume``), and
evaluation and reports are recomputed from the artifacts on disk.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task


def visible_gpus() -> int:
    """GPUs this machine can use, without importing torch into the flow process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def trainer_command(argv: list[str], gpus: int | None = None) -> list[str]:
    gpus = visible_gpus() if gpus is None else gpus
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                "-m", "clip_train.train", *argv]
    return [sys.executable, "-m", "clip_train.train", *argv]


def _run_logged(cmd: list[str], log_path: Path) -> None:
    log = get_run_logger()
    log.info("running: %s", " ".join(cmd))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} exited with {proc.returncode}; "
                           f"log {log_path}:\n{tail}")


@task(name="train", persist_result=True, retries=1, retry_delay_seconds=10)
def train_task(shards: str, model: str, run_dir: str, options: dict) -> dict:
    argv = ["--data", shards, "--model", model, "--out", run_dir, "--resume", "--progress", "off"]
    for key, value in sorted(options.items()):
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    _run_logged(trainer_command(argv), Path(run_dir) / "train.log")
    metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    last = metrics[-1] if metrics else {}
    return {"run_dir": run_dir, "checkpoint": str(Path(run_dir) / "checkpoint.pt"), "steps": last.get("step"),
            "final_loss": last.get("loss")}


def fingerprint(*parts) -> str:
    """Identity of a step's inputs: files by (path, size, mtime), everything else by value."""
    import hashlib

    items = []
    for part in parts:
        if isinstance(part, Path) and part.exists():
            st = part.stat()
            items.append([str(part), st.st_size, st.st_mtime_ns])
        else:
            items.append(part if not isinstance(part, Path) else str(part))
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def done_before(marker: Path, fp: str) -> bool:
    try:
        return marker.read_text().strip() == fp
    except OSError:
        return False


def mark_done(marker: Path, fp: str) -> None:
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(fp)
    os.replace(tmp, marker)


@task(name="evaluate", persist_result=True)
def evaluate_task(run_dir: str, eval_sets: list[str], out: str, linear_probe: bool = False,
                  retrieval: list[str] | None = None, extra: list[str] | None = None) -> dict:
    fp = fingerprint(Path(run_dir) / "checkpoint.pt", eval_sets, linear_probe, retrieval, extra)
    marker = Path(out) / ".done"
    if done_before(marker, fp) and (Path(out) / "eval.json").exists():
        return json.loads((Path(out) / "eval.json").read_text())  # same checkpoint, same sets: nothing to redo
    argv = ["--checkpoint", run_dir, "--out", out, "--eval-set", *eval_sets]
    if linear_probe:
        argv.append("--linear-probe")
    if retrieval:
        argv += ["--retrieval", *retrieval]
    argv += list(extra or [])
    _run_logged([sys.executable, "-m", "clip_train.evaluate", *argv], Path(out) / "eval.log")
    mark_done(marker, fp)
    return json.loads((Path(out) / "eval.json").read_text())


@flow(name="train_model", persist_result=True, log_prints=True)
def train_model(shards: str, model: str = "tiny", run_dir: str = "runs/clip", options: dict | None = None) -> dict:
    """Train (or resume) a CLIP model on webdataset shards (a directory with sizes.json, a brace pattern or
    s3://...). On a GPU work pool this flow is the unit that runs on the GPU machine."""
    return train_task(shards, model, run_dir, options or {})


@flow(name="evaluate_model", persist_result=True, log_prints=True)
def evaluate_model(run_dir: str, eval_sets: list[str], out: str, linear_probe: bool = False,
                   retrieval: list[str] | None = None) -> dict:
    """Zero-shot (and linear-probe / retrieval) evaluation of a trained run; publishes a Markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    result = evaluate_task(run_dir, eval_sets, out, linear_probe, retrieval)
    md = Path(out) / "eval.md"
    if md.exists():
        create_markdown_artifact(key="evaluation", markdown=md.read_text(), description=f"evaluation of {run_dir}")
    return result


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

        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def build_config_from(e2e: EndToEndConfig):
    from flows.build import BuildConfig
    from pipelines.curate.steps import CurateParams

    b = dict(e2e.build)
    curate = dict(b.pop("curate", {}) or {})
    if "langs" in curate:
        curate["langs"] = tuple(curate["langs"])
    b.setdefault("out", str(Path(e2e.out) / "build"))
    return BuildConfig(curate=CurateParams(**curate), **b)


@flow(name="end_to_end", persist_result=True, log_prints=True)
def end_to_end(config: dict) -> dict:
    """build -> train -> evaluate -> audit -> report, from one configuration (a dict of EndToEndConfig fields).

    The audit runs once, after training, so that it can report the CLIP paper's All / Clean / Overlap zero-shot
    statistics with the trained checkpoint next to the overlap table (the build has already decontaminated).
    """
    from prefect.artifacts import create_markdown_artifact

    from flows.audit import audit_task
    from flows.build import build_dataset
    from flows.report import markdown_tables, render_report

    e2e = EndToEndConfig(**config)
    out = Path(e2e.out)
    bcfg = build_config_from(e2e)
    build = build_dataset(bcfg)
    shards = build["shards_dir"]

    audit_sets = e2e.audit.get("eval_sets") or bcfg.eval_sets
    audit_dir = str(out / "audit")

    train_opts = dict(e2e.train)
    model = train_opts.pop("model", "tiny")
    run_dir = str(out / "run")
    if e2e.train_deployment:
        from prefect.deployments import run_deployment

        run_deployment(e2e.train_deployment, parameters={"shards": shards, "model": model, "run_dir": run_dir,
                                                         "options": train_opts})
    else:
        train_task(shards, model, run_dir, train_opts)

    eval_sets = e2e.evaluate.get("eval_sets") or bcfg.eval_sets
    eval_dir = str(out / "eval")
    evaluation = evaluate_task(run_dir, eval_sets, eval_dir, bool(e2e.evaluate.get("linear_probe")),
                               e2e.evaluate.get("retrieval"), e2e.evaluate.get("extra"))
    if audit_sets:  # after training: the paper's All / Clean / Overlap statistics need the trained model
        # Default: the published shards. The demo audits the crawled pool instead, to show what
        # decontamination removed (and that the model does no better on the images whose copies were removed).
        audit_task(e2e.audit.get("dataset") or shards, audit_sets, audit_dir, run_dir, e2e.audit.get("thresholds"))

    report = render_report(str(out / "report.html"), build_dir=bcfg.out, audit_dir=audit_dir if audit_sets else None,
                           run_dir=run_dir, eval_dir=eval_dir, title=f"clipline end-to-end run: {out}")
    for key, md in markdown_tables(build_dir=bcfg.out, audit_dir=audit_dir if audit_sets else None,
                                   eval_dir=eval_dir).items():
        create_markdown_artifact(key=key.replace("_", "-"), markdown=md, description=key)
    return {"report": report, "build": build, "evaluation": evaluation, "run_dir": run_dir}
