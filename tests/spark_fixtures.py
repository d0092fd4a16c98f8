"""A real Spark standalone cluster on 127.0.0.1 for the tests: a master and 2 workers (1 core, 1 GiB each), started
as subprocesses with the ``spark-class`` launcher that pip's pyspark ships (SPARK_HOME = the pyspark package
directory), and stopped at the end. Executors run this interpreter (``sys.executable``) with the repository on
their PYTHONPATH, so they import clipline as the driver does.

If the standalone master cannot start here, :func:`spark_session` falls back to ``local-cluster[2,1,1024]``
(2 executor processes under one JVM launcher); ``SparkCluster.mode`` says which ran."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> str | None:
    try:
        import pyspark
    except ImportError:
        return None
    home = os.path.dirname(pyspark.__file__)
    return home if os.path.exists(os.path.join(home, "bin", "spark-class")) else None


def spark_env(log_dir: Path) -> dict:
    env = {**os.environ, "SPARK_HOME": spark_home() or "", "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_LOCAL_DIRS": str(log_dir / "local"), "SPARK_LOG_DIR": str(log_dir),
           "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    env["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return env


@dataclass
class SparkCluster:
    master_url: str  # spark://127.0.0.1:PORT, or local-cluster[2,1,1024]
    mode: str  # "standalone" or "local-cluster"
    log_dir: Path
    procs: list = field(default_factory=list)
    commands: list = field(default_factory=list)  # the exact command lines run (for infra/spark/README.md)


def start_standalone(log_dir: Path, n_workers: int = 2, timeout: float = 90) -> SparkCluster:
    """`spark-class ...Master` + N x `spark-class ...Worker`; returns once the master lists N alive workers."""
    home = spark_home()
    if home is None:
        raise RuntimeError("pyspark (with bin/spark-class) is not installed")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise RuntimeError("no java on PATH and JAVA_HOME unset")
    env = spark_env(log_dir)
    (log_dir / "local").mkdir(parents=True, exist_ok=True)
    spark_class = os.path.join(home, "bin", "spark-class")
    port, ui = _free_port(), _free_port()
    master_url = f"spark://127.0.0.1:{port}"
    cluster = SparkCluster(master_url, "standalone", log_dir)
    cmds = [[spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", str(ui)]]
    for i in range(n_workers):
        work = log_dir / f"work-{i}"
        work.mkdir(exist_ok=True)
        cmds.append([spark_class, "org.apache.spark.deploy.worker.Worker", master_url, "--host", "127.0.0.1",
                     "--cores", "1", "--memory", "1g", "--webui-port", str(_free_port()), "--work-dir", str(work)])
    try:
        for i, cmd in enumerate(cmds):
            log = open(log_dir / ("master.log" if i == 0 else f"worker-{i - 1}.log"), "wb")
            cluster.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            log.close()
            cluster.commands.append(" ".join(cmd))
        deadline = time.time() + timeout
        while True:
            for p in cluster.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"spark process exited with {p.returncode}: {' '.join(p.args[:2])}; "
                                       f"see {log_dir}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as r:
                    state = json.loads(r.read())
                if state.get("aliveworkers", 0) >= n_workers:
                    return cluster
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"spark master at {master_url} did not list {n_workers} workers in {timeout}s")
            time.sleep(0.5)
    except BaseException:
        stop_cluster(cluster)
        raise


def stop_cluster(cluster: SparkCluster) -> None:
    for p in reversed(cluster.procs):  # workers first, then the master
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in cluster.procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def build_session(master_url: str, n_executors: int = 2, app_name: str = "clipline-crawl-test"):
    """The SparkSession img2dataset's pyspark distributor picks up (it uses the active session when one exists)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    executor_path = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    spark = (SparkSession.builder.master(master_url).appName(app_name)
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.driver.memory", "1g").config("spark.executor.memory", "768m")
             .config("spark.executor.cores", "1").config("spark.cores.max", str(n_executors))
             .config("spark.pyspark.python", sys.executable).config("spark.pyspark.driver.python", sys.executable)
             .config("spark.executorEnv.PYTHONPATH", executor_path)
             .config("spark.executorEnv.NO_ALBUMENTATIONS_UPDATE", "1")
             .config("spark.executorEnv.WANDB_MODE", "disabled")
             .config("spark.ui.enabled", "false").config("spark.task.maxFailures", "1")
             .getOrCreate())
    # Wait until the executors have registered (the driver counts itself in getExecutorMemoryStatus).
    sc = spark.sparkContext
    deadline = time.time() + 90
    while sc._jsc.sc().getExecutorMemoryStatus().size() < n_executors + 1:
        if time.time() > deadline:
            spark.stop()
            raise RuntimeError(f"{n_executors} executors did not register with {master_url}")
        time.sleep(0.5)
    return spark


@pytest.fixture(scope="module")
def spark_session(tmp_path_factory):
    """(SparkSession, SparkCluster): a standalone master + 2 workers on 127.0.0.1, or local-cluster[2,1,1024]
    if the standalone cluster cannot start; stopped (and the JVM gateway shut down) at the end."""
    if spark_home() is None:
        pytest.skip("pyspark is not installed (pip install -r requirements.lock)")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs Java 17: no java on PATH and JAVA_HOME unset")
    log_dir = tmp_path_factory.mktemp("spark")
    os.environ.setdefault("SPARK_HOME", spark_home())
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    try:
        cluster = start_standalone(log_dir)
    except RuntimeError as err:
        print(f"standalone Spark did not start ({err}); using local-cluster[2,1,1024]", file=sys.stderr)
        cluster = SparkCluster("local-cluster[2,1,1024]", "local-cluster", log_dir)
    spark = None
    try:
        spark = build_session(cluster.master_url)
        yield spark, cluster
    finally:
        if spark is not None:
            spark.stop()
        try:
            from pyspark import SparkContext

            gateway = SparkContext._gateway
            if gateway is not None:  # the driver JVM started for this session: it exits when its stdin closes
                proc = getattr(gateway, "proc", None)
                gateway.shutdown()
                SparkContext._gateway = None
                SparkContext._jvm = None
                if proc is not None:
                    if proc.stdin is not None:
                        proc.stdin.close()
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        except Exception:  # noqa: BLE001 - best effort
            pass
        stop_cluster(cluster)
