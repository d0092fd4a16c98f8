"""A real PostgreSQL cluster and a Prefect server on it, started and stopped by the tests themselves.

``postgres_cluster`` runs ``infra/postgres/pgcluster.sh`` (the script infra/README.md documents): initdb into a fresh
directory under /tmp, the server on a free 127.0.0.1 port (as the ``postgres`` user when the tests run as root).
It skips, with the script's reason, only when no PostgreSQL server binaries can be found.

``prefect_pg_server`` runs ``prefect server start`` as a subprocess with its own PREFECT_HOME and
``PREFECT_API_DATABASE_CONNECTION_URL`` pointing at that cluster, and waits for ``/api/health``.

:func:`prefect_process` starts any other Prefect process (a worker, ``clipline serve``) in its own process group;
on exit it stops the group and every descendant, even when the test failed. Nothing started here outlives the
session: every process is stopped and every directory removed in ``finally`` blocks.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PGCLUSTER = ROOT / "infra" / "postgres" / "pgcluster.sh"
PREFECT = str(Path(sys.executable).with_name("prefect"))
NO_BINARIES = 3  # pgcluster.sh's exit code when PostgreSQL is not installed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def stop_process_tree(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the process's group and to every descendant (a flow-run process may start its own session),
    SIGKILL to whatever is left after ``timeout`` seconds."""
    import psutil

    procs = [p for p in (_proc(pid) for pid in (proc.pid, *_descendants(proc.pid))) if p is not None]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=wait)
        if not procs:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _proc(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


@contextlib.contextmanager
def prefect_process(args: list[str], env: dict, log: Path, cwd: Path = ROOT):
    """Run ``args`` (a Prefect CLI or Python command line) until the block ends; yields the Popen."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_tree(proc)


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail(log) if log else ''}")
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tail(log) if log else ''}")


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster on 127.0.0.1: {"url": postgresql+asyncpg://..., "dir": Path, "start_s": float}."""
    parent = Path(tempfile.mkdtemp(prefix="clipline-pg-"))  # /tmp: the postgres user can reach it, unlike pytest's
    os.chmod(parent, 0o755)
    cluster = parent / "cluster"
    env = {**os.environ, "PGCLUSTER_FAST": "1"}
    started = time.monotonic()
    try:
        proc = subprocess.run([str(PGCLUSTER), "start", str(cluster)], env=env, capture_output=True, text=True,
                              timeout=180)
        if proc.returncode == NO_BINARIES:
            pytest.skip(f"PostgreSQL is not available: {proc.stderr.strip()}")
        assert proc.returncode == 0, f"pgcluster.sh start failed ({proc.returncode}):\n{proc.stderr}"
        url = proc.stdout.strip().splitlines()[-1]
        assert url.startswith("postgresql+asyncpg://prefect:"), url
        yield {"url": url, "dir": cluster, "start_s": round(time.monotonic() - started, 1)}
    finally:
        subprocess.run([str(PGCLUSTER), "stop", str(cluster)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_pg_server(postgres_cluster):
    """``prefect server start`` on the PostgreSQL cluster: {"api_url", "env" (for clients and workers), "home",
    "log", "start_s"}. The scheduler service is off, so no cron run of a registered deployment can fire while the
    tests run; every run here is started explicitly."""
    home = Path(tempfile.mkdtemp(prefix="clipline-prefect-"))
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    server_env = {**base, "PREFECT_HOME": str(home),
                  "PREFECT_API_DATABASE_CONNECTION_URL": postgres_cluster["url"],
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
                  "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    client_env = {**base, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = home / "server.log"
    started = time.monotonic()
    try:
        with prefect_process([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env,
                             log) as proc:
            import httpx

            def healthy():
                try:
                    return httpx.get(f"{api_url}/health", timeout=2).json() is True
                except (httpx.HTTPError, ValueError):
                    return False

            wait_until(healthy, 180, "prefect server start on PostgreSQL", proc, log)
            yield {"api_url": api_url, "env": client_env, "home": home, "log": log,
                   "start_s": round(time.monotonic() - started, 1)}
    finally:
        shutil.rmtree(home, ignore_errors=True)
