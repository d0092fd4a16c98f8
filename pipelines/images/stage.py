"""Entry points of the images stage and of rebalancing: plain functions that build and run the Beam pipelines.

``process_images(crawl_dir, pool_dir, cfg)`` turns img2dataset's output into the pool table (every crawled row,
with hashes, status and reason) plus rejected rows; ``rebalance(pool_dir, out_dir, ...)`` redoes MetaCLIP balancing
on what survived and writes the kept uid set. Both run on Beam's DirectRunner unless ``pipeline_args`` say
otherwise (``--runner=DataflowRunner ...``), write each file atomically, write a completion marker last, and on a
rerun with the same inputs and parameters return the recorded result without recomputing.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core import markers, reasons, storage
from pipelines.core.errors import ConfigError
from pipelines.core.config import Config, check
from pipelines.core.stage import MARKER, Stage, StageResult
from pipelines.core.beam import make_options
from pipelines.images.crawl_reader import crawl_shards
from pipelines.images.transforms import (DUPLICATES, OK, REJECTED, CheckImages, ExactDuplicateKeys,
                                         NearDuplicateRoots, ReadCrawl, exact_duplicate_row, near_duplicate_row)
from schemas import conform
from schemas import rejected as rejected_schema
from schemas import sample as sample_schema



@dataclass(frozen=True)
class ImagesConfig(Config):
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
        return cls.from_mapping(d, "images")

    def __post_init__(self):
        w = "images"
        for name, low in (("min_side", 1), ("max_pixels", 1), ("pool_files", 1), ("batch_size", 1)):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"{w}.{name}",
                  f"expected an integer >= {low}, got {v!r}")
        check(isinstance(self.max_aspect, (int, float)) and self.max_aspect >= 1, f"{w}.max_aspect",
              f"expected a number >= 1, got {self.max_aspect!r}")
        check(isinstance(self.near_dup_radius, int) and self.near_dup_radius <= 32, f"{w}.near_dup_radius",
              f"expected an integer <= 32 (< 0 switches near dedup off), got {self.near_dup_radius!r}")
        from pipelines.images.transforms import hash_decode

        try:
            hash_decode(self.exact_hashes, self.reduced_decode)  # a contradictory pair fails here, before any work
        except ValueError as exc:
            raise ConfigError(f"{w}: {exc}") from None


def pipeline_options(pipeline_args: Sequence[str] | None = None) -> PipelineOptions:
    """DirectRunner unless the caller names another runner (Dask / Dataflow / Flink / Spark work by options alone)."""
    return make_options(extra=list(pipeline_args or []))


def _table_bytes(rows: list[dict], schema: pa.Schema, where: str) -> bytes:
    table = pa.Table.from_pylist(rows, schema=pa.schema([f.with_nullable(True) for f in schema]))
    return storage.table_bytes(conform(table, schema, where=where))


def write_rows(uri: str, rows_in: Iterable[dict], schema: pa.Schema, sort_key: str = "uid") -> str:
    """Write rows sorted by ``sort_key`` as one Parquet file, atomically; deterministic bytes."""
    def order(r: dict):
        v = r.get(sort_key)
        return (v is None, 0 if v is None else v)  # rows without the key go last

    rows = []
    # Ties break on the whole row, so the order never depends on arrival; serialised only where keys tie (uids
    # are unique: that is rare, and a JSON dump per row was a tenth of the stage's CPU per row).
    for _key, group in itertools.groupby(sorted(rows_in, key=order), key=order):
        group = list(group)
        if len(group) > 1:
            group.sort(key=lambda r: json.dumps(r, sort_keys=True, default=str))
        rows.extend(group)
    storage.write_bytes_atomic(uri, _table_bytes(rows, schema, uri))
    return uri


def read_rows(uris: Iterable[str], columns: list[str] | None = None) -> list[dict]:
    out = []
    for uri in uris:
        out.extend(storage.read_table(uri, columns=columns).to_pylist())
    return out


def _with_duplicates(grouped) -> list[dict]:
    """One output file's rows with the dedup decisions made on keys applied: an ``ok`` row whose (uid, sha256) has
    a kept uid is an exact duplicate of it (where that is its own uid, the first such row is kept); an ``ok`` row
    that survives with a near-duplicate root is a near duplicate of that root."""
    dups, roots = dict(grouped["dups"]), dict(grouped["roots"])
    out, kept_own = [], set()
    for r in grouped["rows"]:
        if r is None:
            continue
        if r["status"] == "ok":
            uid = r["uid"]
            keeper = dups.get((uid, r["sha256"]))
            if keeper is not None and (keeper != uid or (uid, r["sha256"]) in kept_own):
                r = exact_duplicate_row(r, keeper)
            else:
                if keeper is not None:
                    kept_own.add((uid, r["sha256"]))
                if uid in roots:
                    r = near_duplicate_row(r, roots[uid])
        out.append(r)
    return out


def _bucket(uid: str, n: int) -> int:
    return int(hashlib.blake2b(uid.encode(), digest_size=8).hexdigest(), 16) % n


def pool_files(pool_dir: str) -> list[str]:
    """The samples Parquet files of a finished pool (from its completion marker)."""
    marker = markers.read(storage.join(pool_dir, MARKER))
    if marker is None:
        raise storage.StorageError(f"{pool_dir}: no finished pool ({MARKER} missing); run the images stage first")
    return list(marker["result"]["outputs"]["pool"])


class ImagesStage(Stage):
    """img2dataset's output -> the pool table (every crawled row, with hashes, status and reason).

    inputs: ``{"crawl": CRAWL_DIR}``; output: the pool directory (``samples-NNNNN-of-NNNNN.parquet``);
    ``rejected``: one Parquet file that gets the rows this stage rejects (stages ``images`` and ``dedup``).
    Rows the crawl could not fetch stay in the pool (status ``failed``, stage ``crawl``) but are the crawl
    stage's to report: this stage's input is the crawl's successes.
    """

    name = "images"

    def __init__(self, config: ImagesConfig | None, inputs, output: str, *, rejected: str | None = None,
                 beam_args: Sequence[str] = ()):
        super().__init__(config or ImagesConfig(), inputs, output,
                         rejected=rejected or storage.join(storage.parent(output), "rejected", "images.parquet"),
                         beam_args=beam_args)
        self._shards: list[tuple[str, str]] | None = None

    @property
    def shards(self) -> list[tuple[str, str]]:
        if self._shards is None:
            self._shards = crawl_shards(self.inputs["crawl"])
        return self._shards

    def input_files(self) -> list[str]:
        return [p for p, _t in self.shards]

    def extra_fingerprint(self):
        return {"tars": [t for _p, t in self.shards], "schema": sample_schema.VERSION}

    def compute(self, fingerprint: str) -> StageResult:
        cfg, pool_dir, crawl_dir = self.config, self.output, self.inputs["crawl"]
        n_files = max(1, cfg.pool_files)
        files = [storage.join(pool_dir, f"samples-{i:05d}-of-{n_files:05d}.parquet") for i in range(n_files)]
        with beam.Pipeline(options=pipeline_options(self.beam_args)) as p:
            records = p | "ReadCrawl" >> ReadCrawl(crawl_dir)
            checked = records | "CheckImages" >> CheckImages(cfg.min_side, cfg.max_aspect, cfg.max_pixels,
                                                              cfg.batch_size, cfg.reduced_decode, cfg.exact_hashes)
            # Exact and near duplicates are decided on keys (sha256, uid, pHash); the rows meet the decisions in
            # the one shuffle that groups the output files (a row crosses one shuffle, not two).
            kept = checked[OK] | "ExactKeys" >> ExactDuplicateKeys()
            roots = kept[OK] | "NearRoots" >> NearDuplicateRoots(cfg.near_dup_radius)
            every = (checked[OK], checked[REJECTED]) | "AllRows" >> beam.Flatten()
            buckets = p | "Buckets" >> beam.Create([(i, None) for i in range(n_files)])  # empty files are written
            keyed = every | "ByFile" >> beam.Map(lambda r: (_bucket(r["uid"], n_files), r))
            _ = ({"rows": (keyed, buckets) | "WithEmpty" >> beam.Flatten(),
                  "roots": roots | "RootsByFile" >> beam.Map(lambda kv: (_bucket(kv[0], n_files), kv)),
                  "dups": kept[DUPLICATES] | "DupsByFile" >> beam.Map(lambda kv: (_bucket(kv[0][0], n_files), kv))}
                 | "GroupFiles" >> beam.CoGroupByKey()
                 | "WriteFile" >> beam.Map(lambda kv: write_rows(files[kv[0]], _with_duplicates(kv[1]),
                                                                 sample_schema.SCHEMA)))

        rows = read_rows(files, columns=["uid", "url", "caption", "status", "stage", "reason", "source"])
        fetched = [r for r in rows if r["stage"] != reasons.CRAWL]
        rejected_rows = [r for r in fetched if r["status"] != "ok"]
        write_rows(self.rejected, rejected_rows, rejected_schema.SCHEMA)
        by_reason: dict[str, int] = {}
        for r in rejected_rows:
            key = f"{r['stage']}:{r['reason']}"
            by_reason[key] = by_reason.get(key, 0) + 1
        crawl_failed: dict[str, int] = {}
        for r in rows:
            if r["stage"] == reasons.CRAWL:
                crawl_failed[r["reason"]] = crawl_failed.get(r["reason"], 0) + 1
        return StageResult(stage="images", input_rows=len(fetched), kept=len(fetched) - len(rejected_rows),
                           rejected=by_reason, outputs={"pool": files, "rejected": self.rejected},
                           params=self.params(), fingerprint=fingerprint,
                           details={"crawled_rows": len(rows), "crawl_failed": dict(sorted(crawl_failed.items()))})


def process_images(crawl_dir: str, pool_dir: str, cfg: ImagesConfig | dict | None = None, *,
                   rejected_uri: str | None = None, pipeline_args: Sequence[str] | None = None) -> StageResult:
    """Run :class:`ImagesStage` (reusing a finished pool with the same inputs and config)."""
    cfg = cfg if isinstance(cfg, ImagesConfig) else ImagesConfig.from_dict(cfg)
    return ImagesStage(cfg, {"crawl": crawl_dir}, pool_dir, rejected=rejected_uri,
                       beam_args=pipeline_args or ()).run()
