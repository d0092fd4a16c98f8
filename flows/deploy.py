"""Deployments of clipline's flows: scheduled dataset builds, scheduled contamination audits, the end-to-end run.

``infra/prefect/prefect.yaml`` declares them for ``prefect deploy`` on work pools (a process pool for data work,
a GPU pool for training); :func:`serve_deployments` serves the same deployments from one process on the embedded
default (``clipline serve``), so schedules fire on a single machine without any work pool.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from flows.audit import audit_contamination
from flows.build import BuildConfig, build_dataset
from flows.train import end_to_end, evaluate_model, train_model

FLOWS = {"build_dataset": build_dataset, "audit_contamination": audit_contamination, "end_to_end": end_to_end,
         "train_model": train_model, "evaluate_model": evaluate_model}


def load_serve_config(path: str | Path) -> list[dict]:
    """The deployments section of a prefect.yaml-like file: [{name, flow, cron?, interval?, parameters}]."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    deployments = data.get("deployments") or []
    out = []
    for i, d in enumerate(deployments):
        flow_name = d.get("entrypoint", "").rsplit(":", 1)[-1]
        if flow_name not in FLOWS:
            raise ValueError(f"{path}: deployment {i} ({d.get('name')}) names flow {flow_name!r}; "
                             f"expected one of {sorted(FLOWS)}")
        schedules = d.get("schedules") or []
        cron = next((s["cron"] for s in schedules if "cron" in s), d.get("cron"))
        interval = next((s["interval"] for s in schedules if "interval" in s), d.get("interval"))
        out.append({"name": d["name"], "flow": flow_name, "cron": cron, "interval": interval,
                    "parameters": d.get("parameters") or {}, "description": d.get("description")})
    return out


def _parameters(flow_name: str, parameters: dict) -> dict:
    # build_dataset takes a BuildConfig: YAML gives its fields as a mapping.
    if flow_name == "build_dataset" and isinstance(parameters.get("cfg"), dict):
        from flows.train import EndToEndConfig, build_config_from

        cfg = parameters["cfg"]
        return {"cfg": build_config_from(EndToEndConfig(out=cfg.get("out", "."), build=cfg))}
    return parameters


def make_deployments(specs: list[dict]):
    deployments = []
    for spec in specs:
        flow = FLOWS[spec["flow"]]
        deployments.append(flow.to_deployment(
            name=spec["name"], cron=spec["cron"], interval=spec["interval"],
            parameters=_parameters(spec["flow"], spec["parameters"]), description=spec["description"],
            tags=["clipline"]))
    return deployments


def serve_deployments(config: str | Path, limit: int | None = None) -> None:
    """Create the deployments and run them from this process when their schedules fire (blocks)."""
    from prefect import serve

    serve(*make_deployments(load_serve_config(config)), limit=limit)


__all__ = ["BuildConfig", "FLOWS", "load_serve_config", "make_deployments", "serve_deployments"]
