"""A real dask.distributed cluster on 127.0.0.1 for the tests: a scheduler and 2 worker processes (1 thread each),
started as subprocesses (the `dask` CLI of this environment) and stopped at the end of the session."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dask_cluster(n_workers: int = 2, env: dict | None = None, log_dir: Path | None = None):
    """Start `dask scheduler` + `dask worker --nworkers N`; returns (address, [processes])."""
    dask_cli = str(Path(sys.executable).parent / "dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, **(env or {})}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    logs = [open(log_dir / f"dask-{name}.log", "wb") if log_dir else subprocess.DEVNULL
            for name in ("scheduler", "worker")]
    sched = subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                             env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)
    workers = subprocess.Popen([dask_cli, "worker", address, "--nworkers", str(n_workers), "--nthreads", "1",
                                "--no-dashboard", "--memory-limit", "3GiB"],
                               env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True)
    procs = [workers, sched]
    from distributed import Client

    deadline = time.time() + 90
    while True:
        try:
            with Client(address, timeout=5) as client:
                client.wait_for_workers(n_workers, timeout=max(1, deadline - time.time()))
                break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                stop_dask_cluster(procs)
                raise RuntimeError(f"dask cluster at {address} did not start")
            time.sleep(0.5)
    return address, procs


def stop_dask_cluster(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def dask_cluster(s3_endpoint, tmp_path_factory):
    """Scheduler address of a 2-worker cluster whose workers see the session's S3 endpoint (moto)."""
    address, procs = start_dask_cluster(2, log_dir=tmp_path_factory.mktemp("dask-logs"))
    yield address
    stop_dask_cluster(procs)
