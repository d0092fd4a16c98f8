"""Fingerprints and completion markers: the one way any unit of work (a stage, a shard, a training run) is known
to be finished.

A unit is done when (1) its marker exists, (2) the fingerprint recorded in it equals the one computed now from the
inputs' content hashes, the configuration and the code version, and (3) every file the marker lists still exists.
The marker is written last, atomically, after every file it lists; so a killed run leaves either no marker (the
unit is redone) or a marker whose files are all there. Deleting any listed file makes the next run redo the unit.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from pipelines.core import storage

CODE_VERSION = "clipline-1"  # bump when a stage's outputs change for the same inputs and configuration


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (dicts in key order, tuples as lists)."""
    return hashlib.sha256(canonical_json(list(parts))).hexdigest()


def content_hashes(uris: Iterable[str]) -> list[list[str]]:
    """[[uri, sha256], ...] in the given order: what a fingerprint records about its input files."""
    return [[u, storage.sha256_of(u)] for u in uris]


def read(uri: str) -> dict | None:
    """The marker at ``uri`` as a dict, or None when there is none (or it is not a marker)."""
    if not storage.exists(uri):
        return None
    try:
        marker = json.loads(storage.read_bytes(uri))
    except (ValueError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and "fingerprint" in marker else None


def done(uri: str, fingerprint_: str) -> dict | None:
    """The recorded result when the unit is finished with this fingerprint and all its files exist, else None."""
    marker = read(uri)
    if marker is None or marker.get("fingerprint") != fingerprint_:
        return None
    if not all(storage.exists(f) for f in marker.get("files", [])):
        return None
    return marker.get("result", {})


def write(uri: str, fingerprint_: str, files: Iterable[str], result: dict | None = None) -> None:
    """Record a finished unit: call after every file in ``files`` is written."""
    body = {"fingerprint": fingerprint_, "code_version": CODE_VERSION, "files": sorted(set(files)),
            "result": result or {}}
    storage.write_bytes_atomic(uri, json.dumps(body, indent=1, sort_keys=True, default=str).encode())


def clear(uri: str) -> None:
    """Remove a marker (the unit will be redone)."""
    if storage.exists(uri):
        storage.delete(uri)
