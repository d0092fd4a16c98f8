"""Scheduled deployments: created from infra/prefect/*.yaml on Prefect's real test server, and one run executed."""
import asyncio
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_files_name_real_flows():
    from flows.build import BuildConfig
    from flows.deploy import load_serve_config, make_deployments

    for name in ("prefect.yaml", "local.yaml"):
        specs = load_serve_config(ROOT / "infra" / "prefect" / name)
        assert {s["flow"] for s in specs} >= {"build_dataset", "audit_contamination", "end_to_end"}
        assert any(s["cron"] for s in specs)
        deployments = make_deployments(specs)  # parameters validate against the flows' signatures
        build = next(d for d, s in zip(deployments, specs) if s["flow"] == "build_dataset")
        assert isinstance(build.parameters["cfg"], BuildConfig)


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
