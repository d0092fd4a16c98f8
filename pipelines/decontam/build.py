"""Decontamination step of a dataset build: drop pool samples that are near-duplicates of evaluation images.

Reads the pool's ``ok`` rows and their image bytes (from the crawl tars), matches them with the detector of
``pipelines.decontam`` against every registered evaluation set, and writes (all atomically, marker last):
``DECONTAM/matches.parquet`` (eval_match rows), ``DECONTAM/drop.parquet`` (the uid set to leave out),
the rejected rows (stage ``decontam``) and ``DECONTAM/_SUCCESS.json``. A rerun with the same pool, evaluation
sets and thresholds returns the recorded result.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import storage
from schemas import conform
from schemas import rejected as rejected_schema

MARKER = "_SUCCESS.json"
CHUNK = 1024


def _write(uri: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes_atomic(uri, sink.getvalue())


def decontaminate_build(pool_dir: str, eval_specs: Sequence[str], out_dir: str, *, rejected_uri: str,
                        detector: dict | None = None) -> dict:
    from pipelines.images.stage import pool_files, read_rows

    files = pool_files(pool_dir)
    fingerprint = hashlib.sha256(json.dumps({
        "pool": [(f, storage.sha256_of(f)) for f in files], "eval_sets": list(eval_specs),
        "detector": detector or {}, "rejected_uri": rejected_uri}, sort_keys=True).encode()).hexdigest()
    marker_uri = storage.join(out_dir, MARKER)
    if storage.exists(marker_uri):
        marker = json.loads(storage.read_bytes(marker_uri))
        if marker.get("fingerprint") == fingerprint:
            return marker["result"]

    matches_uri = storage.join(out_dir, "matches.parquet")
    drop_uri = storage.join(out_dir, "drop.parquet")
    cols = ["uid", "url", "caption", "status", "sha256", "crawl_tar", "jpg_offset", "jpg_size"]
    rows = [r for r in read_rows(files, columns=cols) if r["status"] == "ok"]
    errors: list[str] = []
    if eval_specs and rows:
        from pipelines.decontam.detector import DetectorConfig
        from pipelines.decontam.transform import build_index, decontaminate_pool, matches_table
        from pipelines.shard.writer import _read_images

        index = build_index(list(eval_specs))
        cfg = DetectorConfig.from_dict(detector)
        tables = []
        for i in range(0, len(rows), CHUNK):
            chunk = rows[i:i + CHUNK]
            images = _read_images(chunk)
            tables.append(decontaminate_pool(((r["uid"], images[r["uid"]]) for r in chunk), index, cfg, errors))
        matches = pa.concat_tables(tables) if tables else matches_table([])
    else:
        from pipelines.decontam.transform import matches_table

        matches = matches_table([])
    matches = matches.sort_by([("pool_key", "ascending"), ("eval_set", "ascending"), ("eval_id", "ascending")])
    by_uid: dict[str, list[str]] = {}
    for uid, eval_set, eval_id in zip(matches.column("pool_key").to_pylist(), matches.column("eval_set").to_pylist(),
                                      matches.column("eval_id").to_pylist()):
        by_uid.setdefault(uid, []).append(f"{eval_set}:{eval_id}")
    dropped = [r for r in rows if r["uid"] in by_uid]
    _write(matches_uri, matches)
    _write(drop_uri, pa.table({"uid": pa.array(sorted(by_uid), pa.string())}))
    rejected = pa.table({
        "uid": [r["uid"] for r in dropped], "url": [r["url"] for r in dropped],
        "caption": [r["caption"] for r in dropped], "stage": ["decontam"] * len(dropped),
        "reason": ["eval_overlap:" + by_uid[r["uid"]][0].split(":", 1)[0] for r in dropped],
        "source": [";".join(by_uid[r["uid"]][:5]) for r in dropped],
    })
    _write(rejected_uri, conform(rejected, rejected_schema.SCHEMA, where="decontam rejected rows"))
    per_set: dict[str, int] = {}
    for name in matches.column("eval_set").to_pylist():
        per_set[name] = per_set.get(name, 0) + 1
    result = {"eval_sets": list(eval_specs), "pool_ok": len(rows), "n_dropped": len(dropped),
              "matches": matches.num_rows, "matches_per_eval_set": dict(sorted(per_set.items())),
              "drop_uri": drop_uri, "matches_uri": matches_uri, "unreadable": len(errors),
              "detector": detector or {}}
    storage.write_bytes_atomic(marker_uri, json.dumps({"fingerprint": fingerprint, "result": result},
                                                      indent=1, sort_keys=True).encode())
    return result
