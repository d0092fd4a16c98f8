"""Prefect flow ``build_version``: a new version of a dataset root, doing only new work.

    build_version("ROOT", config, as_of="2025-03-01T02:00:00Z")     # -> ROOT/versions/NNNN, LATEST moved last
    build_version("ROOT", None, rebuild_latest=True)                  # the latest version's data minus takedowns

What it does, in order:

1. opens (or creates) the root (:class:`pipelines.dataset.versions.DatasetRoot`) and takes the build config: the
   one given, or with ``rebuild_latest`` the latest version's, pinned to exactly its input files (checked by
   content hash) and its ``as_of`` unless one is given, so nothing is due and nothing is downloaded;
   ``out``/``work`` always point into the root (``ROOT/work/build`` and ``ROOT/work``);
2. the schedule check: when the state key (input content hashes, query list, eval sets, config, takedown set)
   equals the latest version's and none of that version's crawl failures is due for retry at ``as_of``, it ends
   Completed with "nothing changed ... no version written" and writes nothing at all;
3. runs :func:`flows.build.build_dataset` with every stage's work under ``ROOT/work`` (unchanged stages are reused)
   and the crawl stage going through the root's crawl store and takedowns (:mod:`pipelines.dataset.hooks`);
4. publishes ``ROOT/versions/NNNN`` (shards, rejected rows, manifest with a ``dataset`` section, data card,
   VERSION.json) and moves ``LATEST`` last (:func:`pipelines.dataset.versions.publish`).

``as_of`` is the build's clock for the crawl store (which failures are due for retry); it defaults to the wall
clock (schedules) and may not go back before the latest version's. A version built with the same inputs, seed and
``as_of`` is byte-identical (shards, shard Parquet, manifest but for timing fields and the ``dataset`` section)
whether earlier versions exist or not: the crawl stage's output depends only on the candidates and the store's
records, and every later stage is deterministic per uid.

One build per root at a time (schedules run one after the other). Takedowns are recorded by
:func:`record_takedown` (= :func:`pipelines.dataset.takedown.request`, ``clipline takedown``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger

from pipelines.core import storage
from pipelines.core import reasons as R
from pipelines.dataset import takedown as TD
from pipelines.dataset.crawl_store import BackoffPolicy, CrawlStore, format_time, parse_time
from pipelines.dataset.hooks import DatasetHooks
from pipelines.dataset.takedown import request as record_takedown
from pipelines.dataset.versions import DatasetError, DatasetRoot, manifest_sha256, publish, state_key

__all__ = ["build_version", "record_takedown", "due_for_retry", "version_config"]


def _log(msg: str) -> None:
    try:
        get_run_logger().info(msg)
    except Exception:  # noqa: BLE001 - outside a run context
        print(msg)


def version_config(config: Any, root: DatasetRoot):
    """The effective BuildConfig of a version build: ``config`` (BuildConfig, mapping or YAML path) with ``out``
    and ``work`` inside the root."""
    from flows.config import BuildConfig, load_build_config

    where = {"out": root.staging, "work": root.work}
    if isinstance(config, BuildConfig):
        return config.replace(**where)
    if config is None:
        raise DatasetError(f"{root.uri}: a version build needs a build config (inputs, querylist, ...)")
    return load_build_config(config, where)


def due_for_retry(root: DatasetRoot, version: int, store: CrawlStore, as_of: str) -> list[str]:
    """The crawl failures of ``version`` whose back-off has expired at ``as_of``."""
    uri = storage.join(root.version_dir(version), "rejected", "crawl.parquet")
    if not storage.exists(uri):
        return []
    t = storage.read_table(uri, columns=["url", "reason"])
    urls = [u for u, r in zip(t.column("url").to_pylist(), t.column("reason").to_pylist()) if r != R.TAKEDOWN]
    return store.due(as_of, urls)



def _run_build(cfg, hooks: DatasetHooks) -> dict:
    from flows.build import build_dataset

    return build_dataset(cfg.replace(dataset=hooks))  # plan_stages applies the hooks (crawl store, takedowns)


def _backoff(root: DatasetRoot, backoff: Mapping | BackoffPolicy | None) -> BackoffPolicy:
    if isinstance(backoff, BackoffPolicy):
        return backoff
    if backoff is not None:
        return BackoffPolicy.from_mapping(backoff, "backoff")
    return BackoffPolicy.from_mapping(root.settings().get("backoff") or {}, "backoff")


def _pinned_inputs(latest: int, info: dict) -> list[str]:
    """Exactly the input files of version ``latest`` (not what its patterns match now), checked unchanged."""
    pinned = info.get("state", {}).get("inputs") or []
    for uri, sha in pinned:
        if not storage.exists(uri) or storage.sha256_of(uri) != sha:
            raise DatasetError(f"{uri}: changed or gone since version {latest:04d}; --rebuild-latest rebuilds "
                               f"exactly that version's inputs (build a new version from the current inputs instead)")
    return [uri for uri, _sha in pinned]


def _why(rebuild_latest: bool, latest_info: dict | None, key_doc: dict, due: list[str]) -> str:
    """Why this version is built, in words (saved in VERSION.json and the card)."""
    if rebuild_latest:
        return "rebuild of the latest version"
    if latest_info is None:
        return "first version"
    old = latest_info.get("state", {})
    parts = [what for what, changed in (
        ("inputs changed", key_doc["inputs"] != old.get("inputs")),
        ("takedowns changed", key_doc["takedowns"] != old.get("takedowns")),
        ("query list, evaluation sets or config changed",
         any(key_doc[k] != old.get(k) for k in ("querylist", "eval_sets", "params"))),
        (f"{len(due)} crawl failure(s) due for retry", bool(due))) if changed]
    return ", ".join(parts) or "forced"


@flow(name="build_version", log_prints=True)
def build_version(root: str, config: Any = None, as_of: str | None = None, rebuild_latest: bool = False,
                  backoff: Any = None) -> dict:
    """A new version of the dataset at ``root`` (see the module docstring). Returns ``{"status": "built" |
    "unchanged", "version", "message", ...}``."""
    ds = DatasetRoot.open(root, create=not rebuild_latest, dry_run=True)  # created below, once the config is good
    latest = ds.latest()
    latest_info = ds.info(latest) if latest is not None else None
    if rebuild_latest:
        if latest_info is None:
            raise DatasetError(f"{ds.uri}: --rebuild-latest needs a published version; this root has none")
        config = {**latest_info["config"], "inputs": _pinned_inputs(latest, latest_info)}
        as_of = as_of or latest_info["as_of"]
    as_of = format_time(parse_time(as_of))
    if latest_info is not None and parse_time(as_of) < parse_time(latest_info["as_of"]):
        raise DatasetError(f"{ds.uri}: as_of {as_of} is earlier than version {latest:04d}'s ({latest_info['as_of']}); "
                           f"a root's clock only moves forward")
    policy = _backoff(ds, backoff)
    cfg = version_config(config, ds)
    tds = TD.load(ds.takedowns)
    key, key_doc = state_key(cfg, tds.fingerprint())
    store = CrawlStore.open(ds.crawl_store, policy, create=False) if storage.exists(
        storage.join(ds.crawl_store, "STORE.json")) else None
    due = due_for_retry(ds, latest, store, as_of) if latest is not None and store is not None else []

    if latest_info is not None and not rebuild_latest and key == latest_info.get("state_key") and not due:
        msg = (f"nothing changed since version {latest:04d} (same input hashes, nothing due for retry at {as_of}, "
               f"no new takedown): no version written")
        _log(msg)
        return {"status": "unchanged", "version": latest, "message": msg, "as_of": as_of}

    reason = _why(rebuild_latest, latest_info, key_doc, due)
    ds = DatasetRoot.open(root, create=True, backoff=policy.to_dict() if backoff is not None else None)
    ds.clear_aborted()
    n = ds.next_number()
    _log(f"building version {n:04d} of {ds.uri} as of {as_of} ({reason})")
    hooks = DatasetHooks(root=ds.uri, as_of=as_of, backoff=policy)
    summary = _run_build(cfg, hooks)

    from pipelines.dataset.card import write_card

    parent = {"version": latest, "manifest_sha256": manifest_sha256(ds, latest)} if latest is not None else None
    section = {"version": n, "parent": parent, "as_of": as_of, "state_key": key, "root": ds.uri,
               "takedowns": tds.summary(), "reason": reason}
    doc = publish(ds, n, staging=ds.staging, dataset_section=section, write_card=write_card,
                  version_doc={"as_of": as_of, "parent": parent, "state_key": key, "state": key_doc,
                               "config": cfg.to_dict(), "backoff": policy.to_dict(), "reason": reason,
                               "reused": summary.get("reused", []), "takedowns": tds.summary()})
    msg = (f"version {n:04d}: {doc['samples']:,} samples in {doc['shards']} shard(s) ({reason}); "
           f"reused stages: {', '.join(summary.get('reused', [])) or 'none'}")
    _log(msg)
    return {"status": "built", "version": n, "dir": ds.version_dir(n), "message": msg, "as_of": as_of,
            "reused": summary.get("reused", []), "funnel": summary.get("funnel"), "samples": doc["samples"],
            "shards": doc["shards"], "bytes": doc["bytes"]}
