"""Prefect for real: a Prefect server on PostgreSQL, a process work pool and a worker, the deployments of
infra/prefect/prefect.yaml registered with `prefect deploy`, and the nightly build deployment run by the worker.

Everything runs as separate processes, as on a cluster: PostgreSQL (infra/postgres/pgcluster.sh), `prefect server
start`, `prefect worker start`, `prefect deploy`, `prefect deployment run`. The test process only reads the API.
The commands are the ones infra/README.md lists ("from one machine to a cluster").
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import synth_build_config
from tests.pg_fixtures import (  # noqa: F401 - session fixtures used below
    PREFECT,
    ROOT,
    postgres_cluster,
    prefect_pg_server,
    prefect_process,
    tail,
    wait_until,
)

pytestmark = pytest.mark.slow

PREFECT_YAML = ROOT / "infra" / "prefect" / "prefect.yaml"
NIGHTLY = "build_from_config/nightly-build"


def _declared_deployments() -> list[str]:
    """'flow_name/deployment_name' for every deployment prefect.yaml declares (the flow name is the function's)."""
    import yaml

    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return [f"{d['entrypoint'].split(':')[1]}/{d['name']}" for d in spec["deployments"]]


def _cli(args: list[str], env: dict, timeout: float = 180) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _api(server: dict, coro_fn):
    """Run ``coro_fn(client)`` against the test's server (the test process has no PREFECT_API_URL of its own)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings(updates={PREFECT_API_URL: server["api_url"]}):
        return asyncio.run(main())


def _files(d: Path) -> dict[str, bytes]:
    """Every file under ``d``: the bytes of the published data (``.tar``, ``.parquet``, ``sizes.json``); other
    files (completion markers, which name their files by absolute path) by name only."""
    def data(p: Path) -> bool:
        return p.suffix in (".tar", ".parquet") or p.name == "sizes.json"

    return {str(p.relative_to(d)): p.read_bytes() if data(p) else b""
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_nightly_build_deployment_runs_on_a_worker_and_retries_a_transient_fault(
        prefect_pg_server, postgres_cluster, synth_web_small, synth_build, tmp_path):  # noqa: F811 - fixtures above
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    from flows.deploy import FAULT_ENV, build_config_from_mapping

    server, env = prefect_pg_server, prefect_pg_server["env"]
    times = {"postgres_start_s": postgres_cluster["start_s"], "prefect_server_start_s": server["start_s"]}

    # -- work pools and the deployments of infra/prefect/prefect.yaml, registered as an operator would
    t = time.monotonic()
    for pool in ("clipline-process", "clipline-gpu"):
        _cli([PREFECT, "work-pool", "create", pool, "--type", "process"], env)
    out = _cli([sys.executable, "-m", "flows.deploy", "prefect", "--no-prompt", "deploy",
                "--prefect-file", str(PREFECT_YAML.relative_to(ROOT)), "--all"], env)
    times["pools_and_deploy_s"] = round(time.monotonic() - t, 1)
    declared = _declared_deployments()
    assert out.count("successfully created") == len(declared), out

    async def registered(client):
        return {name: await client.read_deployment_by_name(name) for name in declared}

    deps = _api(server, registered)
    nightly = deps[NIGHTLY]
    assert nightly.work_pool_name == "clipline-process" and deps["train_model/gpu"].work_pool_name == "clipline-gpu"
    assert nightly.entrypoint == "flows/deploy.py:build_from_config"
    # the pull step is kept as a template and resolved on the worker, where the code is checked out
    assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                   {"directory": "{{ $CLIPLINE_HOME }}"}}]
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    build_config_from_mapping(nightly.parameters["config"])  # the YAML's config is a valid BuildConfig

    # -- the reference: the session's direct build of the same web with the same config (tests/conftest.py; its
    # crawl settings fit the one-host synthetic web: no per-host circuit breaker or rate limit, so two identical
    # builds give identical rejection reasons)
    ref_out, direct = synth_build
    direct_cfg = synth_build_config(synth_web_small, ref_out)
    synth_web_small["server"].reset_flaky()  # the deployed build meets the web as the reference build did

    # -- the nightly deployment, run by a process worker, with one transient fault injected into check_inputs
    config = {**direct_cfg.to_dict(), "out": str(tmp_path / "deployed")}
    assert build_config_from_mapping(config) == direct_cfg.replace(out=str(tmp_path / "deployed"))
    fault = tmp_path / "fault-once"
    fault.write_text("check_inputs")
    worker_tmp = tmp_path / "worker-tmp"  # the worker's per-run temporary directories, removed with tmp_path
    worker_tmp.mkdir()
    worker_env = {**env, "CLIPLINE_HOME": str(ROOT), FAULT_ENV: str(fault), "PREFECT_WORKER_QUERY_SECONDS": "2",
                  "TMPDIR": str(worker_tmp)}
    worker_log = tmp_path / "worker.log"
    t = time.monotonic()
    with prefect_process([PREFECT, "worker", "start", "--pool", "clipline-process", "--type", "process"],
                         worker_env, worker_log) as worker:
        out = _cli([PREFECT, "deployment", "run", NIGHTLY, "--params", json.dumps({"config": config})], env)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

        def final_state():
            state = _api(server, lambda c: c.read_flow_run(run_id)).state
            return state if state is not None and state.is_final() else None

        state = wait_until(final_state, 600, f"flow run {run_id} of {NIGHTLY}", worker, worker_log, interval=2)
    times["deployment_run_s"] = round(time.monotonic() - t, 1)
    print("\nprefect-on-postgres timings so far:", json.dumps(times))
    assert state.is_completed(), f"{state}\n{tail(worker_log, 80)}"
    assert not fault.exists()  # the first attempt consumed the fault

    # -- Prefect retried check_inputs: one failed attempt, then Completed (read through the API)
    async def runs(client):
        flt = FlowRunFilter(id={"any_": [run_id]})
        task_runs = await client.read_task_runs(flow_run_filter=flt, sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                                                limit=50)
        (check,) = [tr for tr in task_runs if tr.name.startswith("check_inputs")]
        history = await client.read_task_run_states(check.id)
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])),
            sort=FlowRunSort.START_TIME_ASC, limit=10)
        stage_runs = []
        for child in children:
            stage_runs += await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [child.id]}),
                                                      sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
        return check, history, children, stage_runs

    check, history, children, stage_runs = _api(server, runs)
    assert check.run_count == 2 and check.state.is_completed(), check
    names = [s.name for s in history]
    assert names.index("AwaitingRetry") < names.index("Retrying") < names.index("Completed"), names
    assert "injected transient fault at 'check_inputs'" in worker_log.read_text(errors="replace")
    (child,) = children
    assert child.state.is_completed() and child.flow_id != _api(server, lambda c: c.read_flow_run(run_id)).flow_id
    assert stage_runs and all(tr.state.is_completed() for tr in stage_runs), [(t.name, t.state) for t in stage_runs]

    # -- same funnel, same shards, same bytes as the direct call
    m_direct = json.loads((ref_out / "manifest.json").read_text())
    m_deployed = json.loads((tmp_path / "deployed" / "manifest.json").read_text())
    assert m_deployed["funnel"] == m_direct["funnel"] == direct["funnel"]
    assert m_deployed["funnel"]["kept"] > 0
    assert m_deployed["shards"] == m_direct["shards"]
    shards_direct, shards_deployed = _files(ref_out / "shards"), _files(tmp_path / "deployed" / "shards")
    assert shards_deployed.keys() == shards_direct.keys() and any(k.endswith(".tar") for k in shards_direct)
    assert {s["name"] for s in m_direct["shards"]} <= set(shards_direct)
    assert shards_deployed == shards_direct  # tars, Parquet files, sizes.json: byte for byte

    times["total_s"] = round(sum(v for k, v in times.items()), 1)
    print("\nprefect-on-postgres timings:", json.dumps(times))


def test_serve_connects_to_a_given_server(prefect_pg_server, tmp_path):  # noqa: F811 - fixture imported above
    """`clipline serve --server URL` (flows.deploy.serve_deployments(..., server=URL)): the deployments are created on
    that server and their runs execute in the serving process. The served build names a missing input: the run
    fails at once with the file named, and the user error is not retried."""
    from flows.deploy import api_url

    server = prefect_pg_server
    missing = tmp_path / "missing.parquet"
    spec = tmp_path / "served.yaml"
    spec.write_text(json.dumps({"deployments": [{
        "name": "served-build", "entrypoint": "flows/deploy.py:build_from_config",
        "parameters": {"config": {"inputs": [str(missing)], "querylist": str(tmp_path / "ql.parquet"),
                                  "out": str(tmp_path / "out")}}}]}))  # JSON is YAML
    env = {k: v for k, v in server["env"].items() if k != "PREFECT_API_URL"}  # only --server names the server
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "2"
    env["TMPDIR"] = str(tmp_path)  # the runner's per-run temporary directories
    base_url = server["api_url"].removesuffix("/api")  # given as a user would: http://HOST:PORT
    assert api_url(base_url) == server["api_url"]
    log = tmp_path / "serve.log"
    code = f"from flows.deploy import serve_deployments; serve_deployments({str(spec)!r}, server={base_url!r})"
    t = time.monotonic()
    with prefect_process([sys.executable, "-c", code], env, log) as proc:
        def deployment():
            from prefect.exceptions import ObjectNotFound

            async def read(client):
                try:
                    return await client.read_deployment_by_name("build_from_config/served-build")
                except ObjectNotFound:
                    return None
            return _api(server, read)

        dep = wait_until(deployment, 120, "served deployment on the given server", proc, log)
        run = _api(server, lambda c: c.create_flow_run_from_deployment(dep.id))

        def final_state():
            state = _api(server, lambda c: c.read_flow_run(run.id)).state
            return state if state is not None and state.is_final() else None

        state = wait_until(final_state, 180, "served flow run", proc, log, interval=1)
    elapsed = round(time.monotonic() - t, 1)
    assert state.is_failed() and str(missing) in state.message, state

    async def check_inputs_run(client):
        from prefect.client.schemas.filters import FlowRunFilter
        from prefect.client.schemas.sorting import TaskRunSort

        (tr,) = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}),
                                            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=10)
        return tr

    tr = _api(server, check_inputs_run)
    assert tr.name.startswith("check_inputs") and tr.state.is_failed() and tr.run_count == 1  # not retried
    print(f"\nserve --server: deployment created, run executed and failed as expected in {elapsed} s")
