"""Entry points of the images stage and of rebalancing: plain functions that build and run the Beam pipelines.

``process_images(crawl_dir, pool_dir, cfg)`` turns img2dataset's output into the pool table (every crawled row,
with hashes, status and reason) plus rejected rows; ``rebalance(pool_dir, out_dir, ...)`` redoes MetaCLIP balancing
on what survived and writes the kept uid set. Both run on Beam's DirectRunner unless ``pipeline_args`` say
otherwise (``--runner=DataflowRunner ...``), write each file atomically, write a completion marker last, and on a
rerun with the same inputs and parameters return the recorded result without recomputing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core import storage
from pipelines.core.beam import make_options
from pipelines.images.crawl_reader import crawl_shards
from pipelines.images.transforms import OK, REJECTED, CheckImages, ExactDedup, NearDedup, ReadCrawl, Rebalance
from schemas import conform
from schemas import entry_counts as entry_counts_schema
from schemas import rejected as rejected_schema
from schemas import sample as sample_schema

POOL_MARKER = "_SUCCESS.json"
BALANCE_MARKER = "balance.json"


@dataclass(frozen=True)
class ImagesConfig:
    """Parameters of the images stage (saved in its completion marker and in the manifest)."""

    min_side: int = 32  # shorter side of the published image, pixels
    max_aspect: float = 3.0  # long side / short side
    max_pixels: int = 64_000_000  # header size above this is rejected before decoding (decompression bombs)
    near_dup_radius: int = 4  # pHash Hamming radius; < 0 switches near dedup off
    pool_files: int = 1  # number of samples-*.parquet files (rows spread by uid)
    batch_size: int = 256  # images hashed per numpy batch
    exact_hashes: bool = True  # pHash/dHash bit-equal to imagehash (full decode); False: JPEG luma-only decode
    reduced_decode: bool = False  # with exact_hashes=False: luma at a reduced JPEG scale (fastest, least faithful)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ImagesConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"images config: unknown key(s) {sorted(unknown)}")
        return cls(**d)

    def __post_init__(self):
        from pipelines.images.transforms import hash_decode

        hash_decode(self.exact_hashes, self.reduced_decode)  # a contradictory pair fails here, before any work


def pipeline_options(pipeline_args: Sequence[str] | None = None) -> PipelineOptions:
    """DirectRunner unless the caller names another runner (Dataflow / Flink / Spark work by options alone)."""
    return make_options(extra=list(pipeline_args or []))


def _table_bytes(rows: list[dict], schema: pa.Schema, where: str) -> bytes:
    table = pa.Table.from_pylist(rows, schema=pa.schema([f.with_nullable(True) for f in schema]))
    table = conform(table, schema, where=where)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_rows(uri: str, rows: Iterable[dict], schema: pa.Schema, sort_key: str = "uid") -> str:
    """Write rows sorted by ``sort_key`` as one Parquet file, atomically; deterministic bytes."""
    def order(r: dict):
        v = r.get(sort_key)
        # rows without the key go last; ties break on the whole row so the order never depends on arrival
        return (v is None, 0 if v is None else v, json.dumps(r, sort_keys=True, default=str))

    rows = sorted(rows, key=order)
    storage.write_bytes_atomic(uri, _table_bytes(rows, schema, uri))
    return uri


def read_rows(uris: Iterable[str], columns: list[str] | None = None) -> list[dict]:
    out = []
    for uri in uris:
        with storage.open_read(uri) as f:
            out.extend(pq.read_table(f, columns=columns).to_pylist())
    return out


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _read_marker(uri: str, fingerprint: str) -> dict | None:
    if not storage.exists(uri):
        return None
    marker = json.loads(storage.read_bytes(uri))
    if marker.get("fingerprint") != fingerprint:
        return None
    if not all(storage.exists(u) for u in marker.get("files", [])):
        return None
    return marker


def _bucket(uid: str, n: int) -> int:
    return int(hashlib.blake2b(uid.encode(), digest_size=8).hexdigest(), 16) % n


def pool_files(pool_dir: str) -> list[str]:
    """The samples Parquet files of a finished pool (from its completion marker)."""
    marker_uri = storage.join(pool_dir, POOL_MARKER)
    if not storage.exists(marker_uri):
        raise storage.StorageError(f"{pool_dir}: no finished pool ({POOL_MARKER} missing); run process_images first")
    return list(json.loads(storage.read_bytes(marker_uri))["stats"]["files"])


def _funnel(rows: list[dict]) -> dict:
    rejected: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            key = f"{r['stage']}:{r['reason']}"
            rejected[key] = rejected.get(key, 0) + 1
    kept = sum(1 for r in rows if r["status"] == "ok")
    return {"input_rows": len(rows), "kept": kept, "rejected": dict(sorted(rejected.items()))}


def process_images(crawl_dir: str, pool_dir: str, cfg: ImagesConfig | dict | None = None, *,
                   rejected_uri: str | None = None, pipeline_args: Sequence[str] | None = None) -> dict:
    """img2dataset output -> ``pool_dir/samples-NNNNN-of-NNNNN.parquet`` (+ rejected rows); returns the stats.

    ``rejected_uri`` (default ``pool_dir/../rejected/images.parquet``) gets every crawled row that is not ``ok``:
    crawl failures (stage ``crawl``), failed checks (``images``) and duplicates (``dedup``). Stats:
    ``{"input_rows", "kept", "rejected": {"stage:reason": n}, "files", "params"}``.
    """
    cfg = cfg if isinstance(cfg, ImagesConfig) else ImagesConfig.from_dict(cfg)
    rejected_uri = rejected_uri or storage.join(storage.parent(pool_dir), "rejected", "images.parquet")
    inputs = [(p, storage.sha256_of(p), t) for p, t in crawl_shards(crawl_dir)]
    params = dataclasses.asdict(cfg)
    fingerprint = _fingerprint({"inputs": inputs, "params": params, "rejected_uri": rejected_uri,
                                "schema": sample_schema.VERSION})
    marker_uri = storage.join(pool_dir, POOL_MARKER)
    done = _read_marker(marker_uri, fingerprint)
    if done is not None:
        return done["stats"]

    n_files = max(1, cfg.pool_files)
    files = [storage.join(pool_dir, f"samples-{i:05d}-of-{n_files:05d}.parquet") for i in range(n_files)]
    with beam.Pipeline(options=pipeline_options(pipeline_args)) as p:
        records = p | "ReadCrawl" >> ReadCrawl(crawl_dir)
        checked = records | "CheckImages" >> CheckImages(cfg.min_side, cfg.max_aspect, cfg.max_pixels, cfg.batch_size,
                                                          cfg.reduced_decode, cfg.exact_hashes)
        exact = checked[OK] | "ExactDedup" >> ExactDedup()
        near = exact[OK] | "NearDedup" >> NearDedup(cfg.near_dup_radius)
        every = ((near[OK], near[REJECTED], exact[REJECTED], checked[REJECTED]) | "AllRows" >> beam.Flatten())
        buckets = p | "Buckets" >> beam.Create([(i, None) for i in range(n_files)])  # empty files are written too
        keyed = every | "ByFile" >> beam.Map(lambda r: (_bucket(r["uid"], n_files), r))
        _ = ((keyed, buckets)
             | "WithEmpty" >> beam.Flatten()
             | "GroupFiles" >> beam.GroupByKey()
             | "WriteFile" >> beam.Map(lambda kv: write_rows(files[kv[0]], [r for r in kv[1] if r is not None],
                                                             sample_schema.SCHEMA)))

    rows = read_rows(files, columns=["uid", "url", "caption", "status", "stage", "reason", "source"])
    write_rows(rejected_uri, [r for r in rows if r["status"] != "ok"], rejected_schema.SCHEMA)
    stats = {"stage": "images", **_funnel(rows), "files": files, "rejected_uri": rejected_uri, "params": params}
    storage.write_bytes_atomic(marker_uri, json.dumps(
        {"fingerprint": fingerprint, "files": files + [rejected_uri], "stats": stats}, indent=1,
        sort_keys=True).encode())
    return stats


def _uids_from(uris: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for uri in uris:
        out.update(r["uid"] for r in read_rows([uri], columns=["uid"]))
    return out


def rebalance(pool_dir: str, out_dir: str, *, t: float | None = None, target_size: int | None = None,
              seed: int = 0, exclude: Sequence[str] = (), rejected_uri: str | None = None,
              pipeline_args: Sequence[str] | None = None) -> dict:
    """Second MetaCLIP balancing pass over the pool's ``ok`` rows minus ``exclude`` (Parquet files with ``uid``).

    Writes ``out_dir/kept.parquet`` (the kept uid set, sorted), ``out_dir/entry_counts_before.parquet`` and
    ``_after.parquet``, rejected rows (stage ``balance``) to ``rejected_uri`` (default
    ``out_dir/../rejected/balance.parquet``) and ``out_dir/balance.json`` last. Rows named by ``exclude`` are
    left out silently: the stage that excluded them (decontamination) reports them. Returns the balance.json dict:
    ``{"t", "seed", "target_size", "input_rows", "kept", "kept_uri", "counts_before", "counts_after", ...}``.
    """
    if (t is None) == (target_size is None):
        raise ValueError("rebalance: give exactly one of t or target_size")
    rejected_uri = rejected_uri or storage.join(storage.parent(out_dir), "rejected", "balance.parquet")
    files = pool_files(pool_dir)
    exclude = sorted(exclude)
    fingerprint = _fingerprint({"pool": [(f, storage.sha256_of(f)) for f in files],
                                "exclude": [(u, storage.sha256_of(u)) for u in exclude],
                                "t": t, "target_size": target_size, "seed": seed, "rejected_uri": rejected_uri})
    marker_uri = storage.join(out_dir, BALANCE_MARKER)
    done = _read_marker(marker_uri, fingerprint)
    if done is not None:
        return done["result"]

    excluded = _uids_from(exclude)
    kept_uri = storage.join(out_dir, "kept.parquet")
    before_uri = storage.join(out_dir, "entry_counts_before.parquet")
    after_uri = storage.join(out_dir, "entry_counts_after.parquet")
    t_uri = storage.join(out_dir, "t.json")
    cols = ["uid", "url", "caption", "entry_ids", "status", "source"]

    def pool_rows(uri):
        for r in read_rows([uri], columns=cols):
            if r["status"] == "ok" and r["uid"] not in excluded:
                yield r

    def write_counts(uri):
        return lambda pairs: write_rows(uri, [{"entry_id": int(e), "count": int(c)} for e, c in pairs],
                                        entry_counts_schema.SCHEMA, sort_key="entry_id")

    with beam.Pipeline(options=pipeline_options(pipeline_args)) as p:
        rows = p | "PoolFiles" >> beam.Create(files) | "ReadPool" >> beam.FlatMap(pool_rows)
        out = rows | "Rebalance" >> Rebalance(t=t, target_size=target_size, seed=seed)
        _ = (out[OK] | "KeptUids" >> beam.Map(lambda r: {"uid": r["uid"]}) | "AllKept" >> beam.combiners.ToList()
             | "WriteKept" >> beam.Map(lambda rs: write_rows(kept_uri, rs, pa.schema([pa.field("uid", pa.string(),
                                                                                          nullable=False)]))))
        _ = (out[REJECTED] | "AllDropped" >> beam.combiners.ToList()
             | "WriteDropped" >> beam.Map(lambda rs: write_rows(rejected_uri, rs, rejected_schema.SCHEMA)))
        _ = out["counts_before"] | "AllBefore" >> beam.combiners.ToList() | "WriteBefore" >> beam.Map(
            write_counts(before_uri))
        _ = out["counts_after"] | "AllAfter" >> beam.combiners.ToList() | "WriteAfter" >> beam.Map(
            write_counts(after_uri))
        _ = out["t"] | "WriteT" >> beam.Map(lambda v: storage.write_bytes_atomic(t_uri, json.dumps(v).encode()))

    def counts(uri):
        return {int(r["entry_id"]): int(r["count"]) for r in read_rows([uri])}

    kept = read_rows([kept_uri])
    result = {
        "t": json.loads(storage.read_bytes(t_uri)), "seed": seed, "target_size": target_size,
        "input_rows": len(kept) + len(read_rows([rejected_uri], columns=["uid"])), "kept": len(kept),
        "excluded": len(excluded), "kept_uri": kept_uri, "rejected_uri": rejected_uri,
        "counts_before": {str(k): v for k, v in sorted(counts(before_uri).items())},
        "counts_after": {str(k): v for k, v in sorted(counts(after_uri).items())},
    }
    storage.write_bytes_atomic(marker_uri, json.dumps(
        {"fingerprint": fingerprint, "files": [kept_uri, before_uri, after_uri, rejected_uri, t_uri],
         "result": result}, indent=1, sort_keys=True).encode())
    return result


def kept_uids(balance_dir: str) -> list[str]:
    """The kept uid set written by :func:`rebalance`, sorted."""
    return [r["uid"] for r in read_rows([storage.join(balance_dir, "kept.parquet")])]
