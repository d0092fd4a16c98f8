"""Scheduled deployments: created from infra/prefect/*.yaml on Prefect's real test server, and one run executed."""
import asyncio
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_files_name_real_flows():
    from flows.config import BuildConfig
    from flows.deploy import build_config_from_mapping, load_serve_config, make_deployments

    for name in ("prefect.yaml", "local.yaml"):
        specs = load_serve_config(ROOT / "infra" / "prefect" / name)
        assert {s["flow"] for s in specs} >= {"build_from_config", "audit_contamination", "end_to_end"}
        assert any(s["cron"] for s in specs)
        deployments = make_deployments(specs)  # parameters validate against the flows' signatures
        build = next(d for d, s in zip(deployments, specs) if s["flow"] == "build_from_config")
        assert isinstance(build_config_from_mapping(build.parameters["config"]), BuildConfig)


def test_a_typo_in_a_deployments_build_config_fails_when_deploying(tmp_path):
    import yaml

    from flows.deploy import load_serve_config, make_deployments
    from pipelines.core.errors import ConfigError

    doc = yaml.safe_load((ROOT / "infra" / "prefect" / "local.yaml").read_text())
    build = next(d for d in doc["deployments"] if d["entrypoint"].endswith(":build_from_config"))
    build["parameters"]["config"]["crawl"]["timout"] = 3.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"crawl\.timout: unknown key"):
        make_deployments(load_serve_config(bad))


def test_fault_hook_fires_once_and_only_at_its_point(tmp_path, monkeypatch):
    from flows.deploy import FAULT_ENV, inject_fault_once, is_transient

    inject_fault_once("check_inputs")  # unset: nothing happens
    fault = tmp_path / "fault"
    fault.write_text("check_inputs\n")
    monkeypatch.setenv(FAULT_ENV, str(fault))
    inject_fault_once("elsewhere")  # another point: the fault stays armed
    assert fault.exists()
    with pytest.raises(ConnectionError, match="injected transient fault") as info:
        inject_fault_once("check_inputs")
    assert is_transient(info.value) and not fault.exists()
    inject_fault_once("check_inputs")  # consumed: the retry passes


def test_only_connection_and_timeout_errors_are_transient():
    from flows.deploy import is_transient
    from pipelines.core.storage import StorageError

    wrapped = StorageError("s3://b/k: read failed")
    wrapped.__cause__ = TimeoutError("read timed out")
    assert is_transient(wrapped) and is_transient(ConnectionResetError())
    assert not is_transient(StorageError("/x.parquet: does not exist")) and not is_transient(ValueError("bug"))


def test_check_inputs_retries_a_transient_fault_but_not_a_missing_file(prefect_server, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.deploy import FAULT_ENV, check_inputs
    from pipelines.core.storage import StorageError

    (tmp_path / "a.parquet").write_bytes(b"x")
    (tmp_path / "ql.parquet").write_bytes(b"x")
    fault = tmp_path / "fault"
    fault.write_text("check_inputs")
    monkeypatch.setenv(FAULT_ENV, str(fault))

    async def run_count(state):
        async with get_client() as client:
            return (await client.read_task_run(state.state_details.task_run_id)).run_count

    ok = check_inputs([str(tmp_path / "*.parquet")], str(tmp_path / "ql.parquet"), return_state=True)
    assert ok.is_completed() and ok.result() == {"input_files": 2, "querylist": str(tmp_path / "ql.parquet")}
    assert asyncio.run(run_count(ok)) == 2 and not fault.exists()

    missing = check_inputs([str(tmp_path / "nothing-*.csv")], str(tmp_path / "ql.parquet"), return_state=True)
    assert missing.is_failed() and asyncio.run(run_count(missing)) == 1  # a user error is not retried
    with pytest.raises(StorageError, match="nothing-\\*.csv: matches no file"):
        missing.result()


def test_null_paging_fields_are_dropped_from_filter_requests_only(prefect_server):
    from prefect.client.base import PrefectHttpxSyncClient
    from prefect.client.orchestration import get_client

    from flows.deploy import drop_null_paging_fields

    drop_null_paging_fields()
    drop_null_paging_fields()  # idempotent
    with PrefectHttpxSyncClient(base_url="http://127.0.0.1:9/api") as http:
        req = http.build_request("POST", "/flow_runs/filter", json={"limit": None, "offset": 0, "sort": None})
        assert req.content == b'{"offset":0}'
        req = http.build_request("PATCH", "/work_pools/p", json={"concurrency_limit": None})
        assert req.content == b'{"concurrency_limit":null}'  # setting a field to null keeps its meaning

    async def unpaged_reads():  # what `prefect deployment ls` and `prefect deploy` do; 422 on FastAPI >= 0.151
        async with get_client() as client:
            return await client.read_flow_runs(), await client.read_deployments(), await client.read_work_pools()

    assert all(isinstance(r, list) for r in asyncio.run(unpaged_reads()))


def test_serve_with_a_server_that_does_not_answer_is_a_one_line_error(tmp_path):
    import socket

    from flows.deploy import api_url, serve_deployments
    from pipelines.core.errors import ClipError, ConfigError

    assert api_url("http://h:4200") == api_url("http://h:4200/api/") == "http://h:4200/api"
    with pytest.raises(ConfigError, match="expected an http"):
        api_url("h:4200")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(ClipError, match=f"no Prefect server answers at http://127.0.0.1:{port}/api") as info:
            serve_deployments(ROOT / "infra" / "prefect" / "local.yaml", server=f"http://127.0.0.1:{port}")
    assert "\n" not in str(info.value)


def test_scheduled_deployment_is_created_and_runs_once(prefect_server, tmp_path):
    from PIL import Image
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    from flows.deploy import make_deployments

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(folder / f"{i}.png")
    spec = {"name": "test-audit", "flow": "audit_contamination", "cron": "0 4 * * 1", "interval": None,
            "description": "test", "parameters": {"dataset": f"folder:{folder}", "eval_sets": ["digits"],
                                                  "out": str(tmp_path / "audit")}}
    (deployment,) = make_deployments([spec])

    async def scenario():
        deployment_id = await deployment.apply()
        async with get_client() as client:
            dep = await client.read_deployment(deployment_id)
            assert dep.schedules and dep.schedules[0].schedule.cron == "0 4 * * 1"
            run = await client.create_flow_run_from_deployment(deployment_id)
            runner = Runner()
            await runner.execute_flow_run(run.id)
            state = (await client.read_flow_run(run.id)).state
            return state

    state = asyncio.run(scenario())
    assert state.is_completed(), state
    assert (tmp_path / "audit" / "report.json").exists()
