"""Manifest (manifest.json, written last): a dataset's lineage, parameters, versions, funnel and entry counts.

A JSON document, not a table; this module is its versioned description and validator. Required top-level keys:

- ``schema`` / ``version``: "manifest" / VERSION.
- ``lineage``: ``{"inputs": [{"uri", "sha256", "bytes"?}], "querylist": {"uri", "sha256"}}``.
- ``params``: every parameter and seed of every stage (``{"curate": {...}, "images": {...}, ...}``).
- ``tools``: versions (python, clipline, apache-beam, img2dataset, pyarrow, imagehash, ...).
- ``funnel``: ``{"input_rows": n, "kept": n, "stages": {stage: {"in", "out"}}, "rejected": {"stage:reason": n}}``;
  valid only when input_rows == kept + sum(rejected).
- ``entry_counts``: ``{"before": {entry_id: n}, "after": {entry_id: n}}`` around the second balancing pass, and
  (builds since the balancing report) ``"matched"``: every matched candidate's counts before curation's balancing.
- ``shards``: ``[{"name", "n", "tar_sha256", "parquet_sha256"}]`` and ``samples_per_shard``.
"""
from __future__ import annotations

from pipelines.core.errors import ClipError


NAME = "manifest"
VERSION = 1
REQUIRED = ("schema", "version", "lineage", "params", "tools", "funnel", "entry_counts", "shards")
REQUIRED_TOOLS = ("python", "clipline", "apache-beam", "img2dataset", "pyarrow", "imagehash")


class ManifestError(ClipError, ValueError):
    """A manifest is missing a part or its funnel does not add up."""


def validate(manifest: dict) -> dict:
    """Return ``manifest`` unchanged when it is complete and consistent; raise :class:`ManifestError` naming why."""
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"manifest: missing key(s) {missing}")
    if manifest["schema"] != NAME or int(manifest["version"]) != VERSION:
        raise ManifestError(f"manifest: schema {manifest['schema']}/v{manifest['version']}, expected {NAME}/v{VERSION}")
    lineage = manifest["lineage"]
    for i, inp in enumerate(lineage.get("inputs", [])):
        if not inp.get("uri") or not inp.get("sha256"):
            raise ManifestError(f"manifest: lineage.inputs[{i}] needs 'uri' and 'sha256'")
    missing_tools = [t for t in REQUIRED_TOOLS if t not in manifest["tools"]]
    if missing_tools:
        raise ManifestError(f"manifest: tools missing {missing_tools}")
    funnel = manifest["funnel"]
    for k in ("input_rows", "kept", "rejected"):
        if k not in funnel:
            raise ManifestError(f"manifest: funnel missing {k!r}")
    total = int(funnel["kept"]) + sum(int(v) for v in funnel["rejected"].values())
    if total != int(funnel["input_rows"]):
        raise ManifestError(f"manifest: funnel does not add up: kept {funnel['kept']} + rejected "
                            f"{total - int(funnel['kept'])} != input_rows {funnel['input_rows']}")
    counts = manifest["entry_counts"]
    if "before" not in counts or "after" not in counts:
        raise ManifestError("manifest: entry_counts needs 'before' and 'after'")
    n_shard_rows = sum(int(s["n"]) for s in manifest["shards"])
    if n_shard_rows != int(funnel["kept"]):
        raise ManifestError(f"manifest: shards hold {n_shard_rows} samples but the funnel kept {funnel['kept']}")
    return manifest
