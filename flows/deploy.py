"""Deployments of clipline's flows: scheduled dataset builds, scheduled contamination audits, the end-to-end run.

``infra/prefect/prefect.yaml`` declares them for ``prefect deploy`` on work pools (a process pool for data work,
a GPU pool for training); :func:`serve_deployments` serves the same deployments from one process (``clipline
serve``), on the embedded default (a temporary local server on SQLite) or on a given server (``--server URL``).

Deployments give a build as a plain mapping (YAML/JSON parameters). :func:`build_from_mapping` is the one place
where such a mapping becomes a build; the deployment flow :func:`build_from_config` calls it.

``python -m flows.deploy prefect ARGS...`` is the Prefect CLI with :func:`drop_null_paging_fields` applied (needed
for ``prefect deploy`` with the FastAPI of requirements.lock; see there).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path

import yaml
from prefect import flow, task

from pipelines.core import storage
from pipelines.core.errors import ClipError, ConfigError

# ------------------------------------------------------------------------------------------- build from a mapping


def build_config_from_mapping(config: Mapping):
    """A ``BuildConfig`` from a deployment's mapping (its fields; stage configs as nested mappings).

    Unknown keys and bad values fail with a ConfigError naming the key's path (``crawl.timout: unknown key``).
    """
    from flows.config import load_build_config

    return load_build_config(dict(config))


FAULT_ENV = "CLIPLINE_FAULT_ONCE"


def inject_fault_once(point: str) -> None:
    """Fault-injection hook for retry drills and tests (off unless ``$CLIPLINE_FAULT_ONCE`` is set).

    When ``$CLIPLINE_FAULT_ONCE`` names a file whose content is ``point``, the first attempt that reaches ``point``
    deletes the file and raises :class:`ConnectionError` (a transient error); later attempts find no file and pass.
    Deleting is atomic, so exactly one attempt fails even when several processes race.
    """
    path = os.environ.get(FAULT_ENV)
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as f:
            if f.read().strip() != point:
                return
        os.unlink(path)
    except FileNotFoundError:
        return
    raise ConnectionError(f"injected transient fault at {point!r} ({FAULT_ENV}={path})")


def is_transient(exc: BaseException | None) -> bool:
    """A connection or timeout error, raised directly or as the cause of a storage error (retries exhausted)."""
    while exc is not None:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        exc = exc.__cause__
    return False


def _retry_if_transient(task_, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient errors only; a missing input fails at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified here
        return is_transient(exc)
    return False


@task(name="check_inputs", retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_if_transient)
def check_inputs(inputs: list[str], querylist: str) -> dict:
    """Every input pattern matches a file and the query list exists, before any stage starts.

    Storage errors that are transient (connection, timeout) are retried by Prefect; a missing file is a user error
    and fails the run at once with a message naming it.
    """
    inject_fault_once("check_inputs")
    files = storage.expand(inputs)
    if not storage.exists(querylist):
        raise storage.StorageError(f"{querylist}: query list does not exist")
    return {"input_files": len(files), "querylist": querylist}


def build_from_mapping(config: Mapping) -> dict:
    """Build a dataset from a deployment's mapping: the one call deployments make (returns the build summary)."""
    from flows.build import build_dataset

    cfg = build_config_from_mapping(config)
    check_inputs(list(cfg.inputs), cfg.querylist)
    return build_dataset(cfg)


@flow(name="build_from_config", log_prints=True)
def build_from_config(config: dict) -> dict:
    """A dataset build from a plain mapping of BuildConfig fields (the scheduled build deployments run this)."""
    return build_from_mapping(config)


# ------------------------------------------------------------------------------------------------ deployments

# flow name (the entrypoint's function name) -> "module:attribute"; imported only when a deployment needs it
FLOWS = {"build_dataset": "flows.build:build_dataset", "build_from_config": "flows.deploy:build_from_config",
         "audit_contamination": "flows.audit:audit_contamination", "end_to_end": "flows.e2e:end_to_end",
         "train_model": "flows.train:train_model", "evaluate_model": "flows.train:evaluate_model",
         "build_version": "flows.versions:build_version"}


def load_flow(name: str):
    """The Prefect flow object named ``name`` (a key of :data:`FLOWS`)."""
    module, attr = FLOWS[name].split(":")
    if module == "flows.deploy":  # this module (also when it runs as `python -m flows.deploy`)
        return globals()[attr]
    return getattr(importlib.import_module(module), attr)


def load_serve_config(path: str | Path) -> list[dict]:
    """The deployments section of a prefect.yaml-like file: [{name, flow, cron?, interval?, parameters}]."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML file ({str(exc).splitlines()[0]})") from None
    deployments = data.get("deployments") if isinstance(data, dict) else None
    if not isinstance(deployments, list):
        raise ConfigError(f"{path}: expected a 'deployments' list")
    out = []
    for i, d in enumerate(deployments):
        flow_name = str(d.get("entrypoint", "") if isinstance(d, dict) else "").rsplit(":", 1)[-1]
        if flow_name not in FLOWS:
            raise ConfigError(f"{path}: deployment {i} ({d.get('name') if isinstance(d, dict) else d!r}) names flow "
                              f"{flow_name!r}; expected one of {sorted(FLOWS)}")
        if not d.get("name"):
            raise ConfigError(f"{path}: deployment {i} has no name")
        schedules = d.get("schedules") or []
        cron = next((s["cron"] for s in schedules if "cron" in s), d.get("cron"))
        interval = next((s["interval"] for s in schedules if "interval" in s), d.get("interval"))
        out.append({"name": d["name"], "flow": flow_name, "cron": cron, "interval": interval,
                    "parameters": d.get("parameters") or {}, "description": d.get("description")})
    return out


def _parameters(flow_name: str, parameters: dict) -> dict:
    # build_dataset takes a BuildConfig: a YAML that names it directly gives its fields as a mapping.
    if flow_name == "build_dataset" and isinstance(parameters.get("cfg"), dict):
        return {**parameters, "cfg": build_config_from_mapping(parameters["cfg"])}
    if flow_name == "build_from_config" and isinstance(parameters.get("config"), dict):
        build_config_from_mapping(parameters["config"])  # validate now: a typo fails when deploying, not at 2 am
    return parameters


def make_deployments(specs: list[dict]):
    deployments = []
    for spec in specs:
        deployments.append(load_flow(spec["flow"]).to_deployment(
            name=spec["name"], cron=spec["cron"], interval=spec["interval"],
            parameters=_parameters(spec["flow"], spec["parameters"]), description=spec["description"],
            tags=["clipline"]))
    return deployments


# ------------------------------------------------------------------------------------------------ servers

_PAGED_SUFFIXES = ("/filter", "/paginate", "/count")


def drop_null_paging_fields() -> None:
    """Make Prefect 3.8.8's API client work with the FastAPI of requirements.lock (0.154).

    Prefect's client posts ``{"limit": null, "offset": null, "sort": null, ...}`` to its ``.../filter`` endpoints
    when the caller gives no limit; FastAPI up to 0.150 read an explicit null as "use the default", FastAPI 0.151+
    validates it and the server answers 422 (``prefect deploy`` fails after its first deployment, ``prefect
    deployment ls`` and ``client.read_flow_runs()`` fail). This drops the null top-level fields of those request
    bodies in this process, which is what the server did before. Only POSTs to ``/filter``, ``/paginate`` and
    ``/count`` paths are touched (where every body field is optional); updates that set a field to null are not.
    Idempotent. Not needed once fastapi is pinned to <= 0.150 (or Prefect sends no nulls).
    """
    from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient

    for cls in (PrefectHttpxAsyncClient, PrefectHttpxSyncClient):
        original = cls.build_request
        if getattr(original, "_clipline_drops_nulls", False):
            continue

        def build_request(self, *args, _original=original, **kwargs):
            method = kwargs.get("method", args[0] if args else "")
            url = str(kwargs.get("url", args[1] if len(args) > 1 else ""))
            body = kwargs.get("json")
            if (str(method).upper() == "POST" and isinstance(body, dict) and any(v is None for v in body.values())
                    and url.split("?", 1)[0].rstrip("/").endswith(_PAGED_SUFFIXES)):
                kwargs["json"] = {k: v for k, v in body.items() if v is not None}
            return _original(self, *args, **kwargs)

        build_request._clipline_drops_nulls = True
        cls.build_request = build_request



def api_url(server: str) -> str:
    """The API URL of a Prefect server given as ``http(s)://HOST:PORT`` or ``.../api`` (a trailing slash is fine)."""
    url = str(server).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--server {server}: expected an http:// or https:// URL of a Prefect server "
                          "(e.g. http://127.0.0.1:4200)")
    return url if url.endswith("/api") else url + "/api"


def check_server(server: str, timeout: float = 10.0) -> dict:
    """Connect to the Prefect server at ``server``: its API URL and version, or a one-line :class:`ClipError`."""
    import httpx

    url = api_url(server)
    try:
        health = httpx.get(f"{url}/health", timeout=timeout)
        health.raise_for_status()
        version = httpx.get(f"{url}/admin/version", timeout=timeout)
        version.raise_for_status()
    except httpx.HTTPError as exc:
        raise ClipError(f"--server {server}: no Prefect server answers at {url} ({type(exc).__name__}: {exc})") \
            from None
    if health.json() is not True:
        raise ClipError(f"--server {server}: {url}/health answered {health.text[:100]!r}, not true")
    return {"api_url": url, "version": version.json()}


def serve_deployments(config: str | Path, limit: int | None = None, server: str | None = None) -> None:
    """Create the deployments and run them from this process when their schedules fire (blocks).

    ``server``: a Prefect server URL (``http://HOST:4200`` or ``.../api``) to register the deployments on and to
    report runs to; checked first (a one-line :class:`ClipError` when nothing answers). Without it, Prefect's
    default applies: ``PREFECT_API_URL`` when set, else a temporary local server (SQLite) for this process.
    """
    from prefect import serve

    drop_null_paging_fields()
    if server is None:
        serve(*make_deployments(load_serve_config(config)), limit=limit)
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = check_server(server)["api_url"]  # first: an unreachable server fails before any flow is imported
    deployments = make_deployments(load_serve_config(config))
    # The runner reads the API URL from the current settings, and passes them on to the flow-run processes it starts.
    with temporary_settings(updates={PREFECT_API_URL: url}):
        serve(*deployments, limit=limit)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.deploy prefect ARGS...``: the Prefect CLI with :func:`drop_null_paging_fields` applied
    (e.g. ``prefect --no-prompt deploy --prefect-file infra/prefect/prefect.yaml --all``, ``prefect deployment ls``);
    ``python -m flows.deploy check-server URL``: the API URL and version of a Prefect server, or a one-line error."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prefect"]:
        drop_null_paging_fields()
        from prefect.cli import app

        sys.argv = ["prefect", *argv[1:]]  # Prefect's entry point reads its arguments from sys.argv
        app()
        return 0
    if argv[:1] == ["check-server"] and len(argv) == 2:
        try:
            info = check_server(argv[1])
        except ClipError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{info['api_url']} (Prefect server {info['version']})")
        return 0
    print("usage: python -m flows.deploy prefect PREFECT_ARGS... | check-server URL", file=sys.stderr)
    return 2


__all__ = ["FLOWS", "FAULT_ENV", "api_url", "build_config_from_mapping", "build_from_config",
           "build_from_mapping", "check_inputs", "check_server", "drop_null_paging_fields", "inject_fault_once",
           "is_transient", "load_flow", "load_serve_config", "main", "make_deployments", "serve_deployments"]


if __name__ == "__main__":
    raise SystemExit(main())
