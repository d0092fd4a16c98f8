"""Prefect flows downstream of a build: ``train_model`` and ``evaluate_model`` (``end_to_end`` is in flows/e2e.py).

Training and evaluation run as subprocesses of the flow (``python -m clip_train.train`` / ``torchrun`` when several
GPUs are visible), so the flow process never holds a model and the same flow can run on a GPU work pool
(infra/prefect/README.md). Flows pass URIs (shard patterns, run directories), never data. A rerun after a crash
continues: the build skips finished units, training resumes from its last checkpoint (``--resume``), and
evaluation is reused when its completion marker (:mod:`pipelines.core.markers`, through
:mod:`clip_train.reuse`) matches the checkpoint's and the evaluation sets' content. Every read and write of a run or
an evaluation directory goes through :mod:`pipelines.core.storage` (local or s3://).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from prefect import flow, get_run_logger, task

from clip_train.reuse import done_before, fingerprint, mark_done, model_files
from pipelines.core import storage

__all__ = ["visible_gpus", "trainer_command", "train_task", "evaluate_task", "train_model", "evaluate_model",
           "fingerprint", "done_before", "mark_done"]


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


def _run_logged(cmd: list[str], log_uri: str) -> None:
    """Run a command; its output is appended to ``log_uri`` (local or s3://, written whole through storage)."""
    log = get_run_logger()
    log.info("running: %s", " ".join(cmd))
    with tempfile.TemporaryFile() as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        f.seek(0)
        output = f.read()
    previous = storage.read_bytes(log_uri) if storage.exists(log_uri) else b""
    storage.write_bytes_atomic(log_uri, previous + output)
    if proc.returncode != 0:
        tail = output.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} exited with {proc.returncode}; "
                           f"log {log_uri}:\n{tail}")


@task(name="train", persist_result=True, retries=1, retry_delay_seconds=10)
def train_task(shards: str, model: str, run_dir: str, options: dict) -> dict:
    argv = ["--data", shards, "--model", model, "--out", run_dir, "--resume", "--progress", "off"]
    for key, value in sorted(options.items()):
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    _run_logged(trainer_command(argv), storage.join(run_dir, "train.log"))
    metrics_uri = storage.join(run_dir, "metrics.jsonl")
    lines = storage.read_bytes(metrics_uri).decode().splitlines() if storage.exists(metrics_uri) else []
    metrics = [json.loads(line) for line in lines if line]
    last = metrics[-1] if metrics else {}
    return {"run_dir": run_dir, "checkpoint": storage.join(run_dir, "checkpoint.pt"), "steps": last.get("step"),
            "final_loss": last.get("loss")}


@task(name="evaluate", persist_result=True)
def evaluate_task(run_dir: str, eval_sets: list[str], out: str, linear_probe: bool = False,
                  retrieval: list[str] | None = None, extra: list[str] | None = None) -> dict:
    # The checkpoint counts by content (any format clip_train.interop reads), the evaluation sets by spec.
    fp = fingerprint("evaluate", model_files(run_dir), list(eval_sets), linear_probe, retrieval, extra)
    marker = storage.join(out, ".done")
    eval_json = storage.join(out, "eval.json")
    if done_before(marker, fp):
        return storage.read_json(eval_json)  # same checkpoint, same sets: nothing to redo
    argv = ["--checkpoint", run_dir, "--out", out, "--eval-set", *eval_sets]
    if linear_probe:
        argv.append("--linear-probe")
    if retrieval:
        argv += ["--retrieval", *retrieval]
    argv += list(extra or [])
    _run_logged([sys.executable, "-m", "clip_train.evaluate", *argv], storage.join(out, "eval.log"))
    mark_done(marker, fp, [eval_json, storage.join(out, "eval.md")])
    return storage.read_json(eval_json)


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
    md = storage.join(out, "eval.md")
    if storage.exists(md):
        create_markdown_artifact(key="evaluation", markdown=storage.read_bytes(md).decode(),
                                 description=f"evaluation of {run_dir}")
    return result
