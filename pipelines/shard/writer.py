"""The resharder: kept uid set + pool -> ``DEST/NNNNN.tar`` + ``NNNNN.parquet`` + ``sizes.json``, local or S3.

Order is a seeded hash of uid (never arrival order), cut into fixed ``samples_per_shard`` (the last shard may be
smaller). Image bytes are read back from the crawl tars by (offset, size) and checked against the pool's sha256.
Each shard is built in a local temp file and published whole (rename, single PUT or multipart upload), then a
completion marker ``DEST/_done/NNNNN.json`` records the plan hash and the content hashes; a rerun skips a shard
whose marker matches its plan and whose files still have those hashes. Shards run in parallel as a Beam ParDo.
``sizes.json`` is written after every shard; the caller writes the manifest last (:func:`write_manifest`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import typing
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import apache_beam as beam

import pyarrow as pa

from pipelines.core import markers, storage
from pipelines.core.config import Config, check
from pipelines.core.errors import ClipError, ConfigError
from pipelines.core.stage import Stage, StageResult
from pipelines.images.stage import pipeline_options, pool_files, read_rows, _table_bytes
from pipelines.shard.tarball import write_samples
from schemas import manifest as manifest_schema
from schemas import sample as sample_schema

FORMAT_VERSION = 1  # bump when the shard layout changes, so old markers stop matching
DONE_DIR = "_done"
PLAN_DIR = "plans"  # DEST/_done/plans/NNNNN.arrow: each shard's rows while the stage runs
_SHARD_COLS = [f.name for f in sample_schema.SHARD_SCHEMA if f.name != "key"]


class ShardError(ClipError):
    """The kept set and the pool disagree, or an image read back does not match its recorded hash."""


def order_key(seed: int, uid: str) -> bytes:
    return hashlib.blake2b(f"{seed}:shard:{uid}".encode(), digest_size=16).digest()


@dataclass(frozen=True)
class ShardConfig(Config):
    """How the published shards are cut: samples per shard and the seed of the shard order."""

    samples_per_shard: int = 1000
    seed: int = 0

    def __post_init__(self):
        check(isinstance(self.samples_per_shard, int) and not isinstance(self.samples_per_shard, bool)
              and self.samples_per_shard >= 1, "shard.samples_per_shard",
              f"expected an integer >= 1, got {self.samples_per_shard!r}")
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "shard.seed",
              f"expected an integer, got {self.seed!r}")


def plan_shards(rows: list[dict], samples_per_shard: int, seed: int) -> list[list[dict]]:
    """Rows in seeded-hash order, cut into shards of ``samples_per_shard`` (the last may be smaller)."""
    if samples_per_shard <= 0:
        raise ConfigError(f"samples_per_shard must be positive, got {samples_per_shard}")
    ordered = sorted(rows, key=lambda r: (order_key(seed, r["uid"]), r["uid"]))
    return [ordered[i:i + samples_per_shard] for i in range(0, len(ordered), samples_per_shard)]


def _sample_json(row: dict) -> bytes:
    doc = {"uid": row["uid"], "key": row["uid"], "url": row["url"], "caption": row["caption"],
           "entry_ids": [int(e) for e in row["entry_ids"]], "sha256": row["sha256"],
           "phash": f"{int(row['phash']):016x}" if row.get("phash") is not None else None,
           "dhash": f"{int(row['dhash']):016x}" if row.get("dhash") is not None else None,
           "width": row.get("width"), "height": row.get("height"),
           "original_width": row.get("original_width"), "original_height": row.get("original_height")}
    return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()


def _plan_hash(rows: list[dict]) -> str:
    doc = {"format": FORMAT_VERSION, "rows": [[r["uid"], r["sha256"], r["url"], r["caption"],
                                               list(r["entry_ids"])] for r in rows]}
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False).encode()).hexdigest()


def _read_images(rows: list[dict]) -> dict[str, bytes]:
    """uid -> image bytes, read from the crawl tars (one open per tar, members in offset order)."""
    by_tar: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_tar[r["crawl_tar"]].append(r)
    out = {}
    for tar_uri in sorted(by_tar):
        with storage.open_read(tar_uri) as f:
            for r in sorted(by_tar[tar_uri], key=lambda r: r["jpg_offset"]):
                f.seek(int(r["jpg_offset"]))
                data = f.read(int(r["jpg_size"]))
                if hashlib.sha256(data).hexdigest() != r["sha256"]:
                    raise ShardError(f"{tar_uri}: image of uid {r['uid']} at offset {r['jpg_offset']} does not "
                                     f"match its pool sha256 (crawl changed since the images stage?)")
                out[r["uid"]] = data
    return out


def _shard_is_done(dest: str, name: str, plan: str) -> dict | None:
    """The shard's recorded result when its marker matches the plan and its files have the recorded hashes."""
    marker = markers.done(storage.join(dest, DONE_DIR, f"{name}.json"), plan)
    if marker is None:
        return None
    for ext in ("tar", "parquet"):
        if storage.sha256_of(storage.join(dest, f"{name}.{ext}")) != marker[f"{ext}_sha256"]:
            return None
    return marker


def write_one_shard(index: int, rows: list[dict], dest: str) -> dict:
    """Build and publish shard ``index`` (tar, Parquet, then its marker), or return its marker if already done."""
    name = f"{index:05d}"
    plan = _plan_hash(rows)
    done = _shard_is_done(dest, name, plan)
    if done is not None:
        return done
    images = _read_images(rows)
    samples = [(r["uid"], {"jpg": images[r["uid"]], "txt": (r["caption"] or "").encode(), "json": _sample_json(r)})
               for r in rows]
    parquet_bytes = _table_bytes([{"key": r["uid"], **{c: r.get(c) for c in _SHARD_COLS}} for r in rows],
                                 sample_schema.SHARD_SCHEMA, f"{dest}/{name}.parquet")
    fd, tmp = tempfile.mkstemp(prefix=f"clipline-shard-{name}-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as f:
            write_samples(f, samples)
        tar_sha = storage.sha256_of(tmp)
        storage.write_file_atomic(storage.join(dest, f"{name}.tar"), tmp)
    finally:
        os.unlink(tmp)
    storage.write_bytes_atomic(storage.join(dest, f"{name}.parquet"), parquet_bytes)
    tar_uri, parquet_uri = storage.join(dest, f"{name}.tar"), storage.join(dest, f"{name}.parquet")
    result = {"name": f"{name}.tar", "n": len(rows), "plan": plan, "tar_sha256": tar_sha,
              "parquet_sha256": hashlib.sha256(parquet_bytes).hexdigest(),
              "tar_bytes": storage.size_of(tar_uri), "parquet_bytes": len(parquet_bytes)}
    markers.write(storage.join(dest, DONE_DIR, f"{name}.json"), plan, [tar_uri, parquet_uri], result)
    return result


def _rows_to_ipc(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pylist(rows, schema=sample_schema.SCHEMA)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _rows_from_ipc(data: bytes) -> list[dict]:
    return pa.ipc.open_stream(data).read_all().to_pylist()


def _load_kept(kept_uids: Sequence[str] | str) -> list[str]:
    if isinstance(kept_uids, str):
        return [r["uid"] for r in read_rows([kept_uids], columns=["uid"])]
    return list(kept_uids)


def _remove_stale(dest: str, n_shards: int) -> None:
    """Shards numbered past this plan (left by an earlier, larger run) would be globbed by a trainer: remove."""
    try:
        existing = storage.list_prefix(dest)
    except storage.StorageError:
        return
    for uri in existing:
        stem = storage.basename(uri).split(".")[0]
        if stem.isdigit() and len(stem) == 5 and int(stem) >= n_shards:
            storage.delete(uri)


class ShardStage(Stage):
    """Kept uid set + pool -> the published shards. inputs: ``{"pool": POOL_DIR, "kept": KEPT_PARQUET}``;
    output: the shards directory. Every kept uid must be an ``ok`` row of the pool (else :class:`ShardError`)."""

    name = "shard"

    def input_files(self) -> list[str]:
        return pool_files(self.inputs["pool"]) + [self.inputs["kept"]]

    def verify(self, recorded: StageResult) -> bool:
        # cheap check that no published shard was damaged (truncated, replaced) since it was written
        for s in recorded.details["shards"]:
            stem = storage.join(self.output, s["name"][:-4])
            for ext in ("tar", "parquet"):
                if storage.size_of(f"{stem}.{ext}") != s[f"{ext}_bytes"]:
                    return False
        return True

    def compute(self, fingerprint: str) -> StageResult:
        cfg, dest, pool_dir = self.config, self.output, self.inputs["pool"]
        kept = _load_kept(self.inputs["kept"])
        wanted = set(kept)
        if len(wanted) != len(kept):
            raise ShardError(f"{self.inputs['kept']}: the kept uid set has duplicates")
        rows = [r for r in read_rows(pool_files(pool_dir)) if r["uid"] in wanted and r["status"] == "ok"]
        found = {r["uid"] for r in rows}
        if found != wanted:
            missing = sorted(wanted - found)
            raise ShardError(f"{len(missing)} kept uid(s) are not ok rows of the pool {pool_dir}, e.g. {missing[0]}")
        plan = plan_shards(rows, cfg.samples_per_shard, cfg.seed)
        _remove_stale(dest, len(plan))
        # Each shard's rows are one Arrow IPC file beside the markers, and the pipeline carries only its name: as
        # Python dicts Beam would infer a type from every value of every row and encode them one by one through the
        # reshuffle (~0.8 ms of CPU a row, measured), and values given to beam.Create are pickled (and
        # bz2-compressed) into the pipeline itself, several times while it is built (1.4 s of CPU for 4,812 rows,
        # growing with the pool). Files in ``dest`` are where a worker on another machine can read them.
        plan_dir = storage.join(dest, DONE_DIR, PLAN_DIR)
        storage.delete_prefix(plan_dir)
        names = []
        for i, rows in enumerate(plan):
            names.append((i, storage.join(plan_dir, f"{i:05d}.arrow")))
            storage.write_bytes_atomic(names[-1][1], _rows_to_ipc(rows))
        with beam.Pipeline(options=pipeline_options(self.beam_args)) as p:
            _ = (p
                 | "Plan" >> beam.Create(names).with_output_types(typing.Tuple[int, str])
                 | "Spread" >> beam.Reshuffle()
                 | "WriteShard" >> beam.Map(lambda item: write_one_shard(
                     item[0], _rows_from_ipc(storage.read_bytes(item[1])), dest)))
        storage.delete_prefix(plan_dir)
        # Markers (not Beam's in-memory results) are the record, so a runner on other machines works the same.
        shards = [markers.read(storage.join(dest, DONE_DIR, f"{i:05d}.json"))["result"] for i in range(len(plan))]
        sizes = {s["name"]: s["n"] for s in shards}
        sizes_uri = storage.write_json(storage.join(dest, "sizes.json"), sizes)
        files = [storage.join(dest, s["name"][:-4] + ext) for s in shards for ext in (".tar", ".parquet")]
        n = sum(s["n"] for s in shards)
        return StageResult(stage="shard", input_rows=len(kept), kept=n, rejected={},
                           outputs={"shards": files, "sizes": sizes_uri}, params=self.params(),
                           fingerprint=fingerprint, details={"shards": shards})


def write_shards(pool_dir: str, kept_uids: Sequence[str] | str, dest: str, samples_per_shard: int = 10_000,
                 seed: int = 0, *, pipeline_args: Sequence[str] | None = None) -> list[dict]:
    """Write the final shards for ``kept_uids`` (a Parquet URI with a ``uid`` column, or a list) into ``dest``.

    Returns one dict per shard, in order: ``{"name": "00000.tar", "n", "tar_sha256", "parquet_sha256", "plan",
    "tar_bytes", "parquet_bytes"}``.
    """
    if not isinstance(kept_uids, str):  # a list: written next to the shards' markers so the stage can hash it
        uids = list(kept_uids)
        kept_uri = storage.join(dest, DONE_DIR, "kept.parquet")
        table = pa.table({"uid": pa.array(uids, pa.string())})
        if not storage.exists(kept_uri) or not storage.read_table(kept_uri).equals(table):
            storage.write_table(kept_uri, table)
        kept_uids = kept_uri
    stage = ShardStage(ShardConfig(samples_per_shard, seed), {"pool": pool_dir, "kept": kept_uids}, dest,
                       beam_args=pipeline_args or ())
    return stage.run().details["shards"]


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shaped a dataset (for the manifest)."""
    out = {"python": platform.python_version()}
    for dist in ("clipline", "apache-beam", "img2dataset", "pyarrow", "imagehash", "pillow", "numpy", "webdataset",
                 "boto3"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def write_manifest(uri: str, manifest: dict) -> dict:
    """Validate (schemas.manifest) and write ``manifest.json`` atomically; call it LAST, after every shard."""
    doc = {"schema": manifest_schema.NAME, "version": manifest_schema.VERSION, **manifest}
    doc.setdefault("tools", tool_versions())
    manifest_schema.validate(doc)
    storage.write_bytes_atomic(uri, json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False).encode())
    return doc
