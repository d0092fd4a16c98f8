"""Reading a finished crawl: one outcome per candidate, a success (where its image is, with the hashes computed in
the crawl) or a rejected row with a normalised reason; and the per-host report."""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.crawl.politeness import HostStats
from pipelines.crawl.reasons import normalise_reason
from pipelines.crawl.rounds import CrawlError, CrawlIncompleteError, RoundInfo, list_rounds, load_round_config
from schemas import conform
from schemas import rejected as rejected_schema

STAGE = "crawl"


@dataclass
class CrawlOutcome:
    """``successes``: one row per candidate that produced an image (uid, key, tar, member, url, caption,
    entry_ids, width, height, original_width, original_height, sha256, round, crawl_tar, source, jpg_offset,
    jpg_size, img_sha256, img_width, img_height, img_error, phash, dhash and the other carried columns); ``tar``
    and ``parquet`` are relative to ``crawl_dir``, ``crawl_tar`` and ``source`` are full URIs. ``failures``: one
    row per candidate without an image, with ``reason``, img2dataset's ``error_message`` and ``timeouts``.
    ``rejected``: the failures as schemas.rejected rows (stage "crawl")."""

    crawl_dir: str
    successes: pa.Table
    failures: pa.Table
    reasons: Counter = field(default_factory=Counter)

    @property
    def rejected(self) -> pa.Table:
        f = self.failures
        source = [f"{STAGE}/{p}:{k}" if p else f"{STAGE}:{u}" for p, k, u in
                  zip(f.column("parquet").to_pylist(), f.column("key").to_pylist(), f.column("uid").to_pylist())]
        table = pa.table({
            "uid": f.column("uid"),
            "url": f.column("url"),
            "caption": f.column("caption"),
            "stage": pa.array([STAGE] * f.num_rows, pa.string()),
            "reason": f.column("reason"),
            "source": pa.array(source, pa.string()),
        })
        return conform(table, rejected_schema.SCHEMA, where=f"{self.crawl_dir} crawl failures")

    @property
    def n_candidates(self) -> int:
        return self.successes.num_rows + self.failures.num_rows

    def iter_images(self) -> Iterator[tuple[dict, bytes]]:
        """Yield (success row, image bytes) for every success, in (tar, offset) order, reading each image by its
        recorded offset (or, for shards without offsets, by walking the tar once)."""
        import tarfile

        rows = sorted(self.successes.to_pylist(), key=lambda r: (r["crawl_tar"], r.get("jpg_offset") or 0,
                                                                 r["key"]))
        for tar_uri, group in itertools.groupby(rows, key=lambda r: r["crawl_tar"]):
            group = list(group)
            with storage.open_read(tar_uri) as f:
                if all(r.get("jpg_offset") is not None for r in group):
                    for r in group:
                        f.seek(int(r["jpg_offset"]))
                        yield r, f.read(int(r["jpg_size"]))
                    continue
                wanted = {r["member"]: r for r in group}
                found: dict[str, bytes] = {}
                with tarfile.open(fileobj=f, mode="r|") as tf:
                    for member in tf:
                        if member.name in wanted:
                            found[member.name] = tf.extractfile(member).read()
            for name, row in wanted.items():
                if name not in found:
                    raise CrawlError(f"{tar_uri}: member {name} listed as a success is missing")
                yield row, found[name]


def _relative(crawl_dir: str, uri: str) -> str:
    base = str(crawl_dir).rstrip("/") + "/"
    return uri[len(base):] if uri.startswith(base) else uri


def shard_stats(info: RoundInfo) -> list[dict]:
    """The published ``_stats.json`` of every finished shard of a round."""
    return [storage.read_json(info.shard_uri(i, "_stats.json")) for i in info.done_shards]


def _read_round_rows(crawl_dir: str, info: RoundInfo) -> pa.Table | None:
    parts = []
    for shard_id in info.done_shards:
        pq_uri, tar_uri = info.shard_uri(shard_id, ".parquet"), info.shard_uri(shard_id, ".tar")
        try:
            with storage.open_read(pq_uri) as f:
                t = pq.read_table(f)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CrawlError(f"{pq_uri}: unreadable crawl shard metadata ({exc})") from None
        n = t.num_rows
        for name, value, tp in (("round", info.round_no, pa.int32()), ("tar", _relative(crawl_dir, tar_uri), None),
                                ("parquet", _relative(crawl_dir, pq_uri), None), ("crawl_tar", tar_uri, None),
                                ("source", pq_uri, None)):
            t = t.append_column(name, pa.array([value] * n, tp or pa.string()))
        parts.append(t)
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def crawl_outcome(crawl_dir: str, *, max_round: int | None = None) -> CrawlOutcome:
    """The outcome of every candidate of a crawl (rounds up to ``max_round``, default all).

    A candidate that succeeded in any round is a success (its earliest success); otherwise it is a failure with
    the reason of its latest attempt. Every candidate of round 0 gets exactly one outcome: one missing from the
    crawl's output is a failure ``missing_from_output``. Unfinished rounds raise CrawlIncompleteError.
    """
    crawl_dir = str(crawl_dir)
    rounds = [r for r in list_rounds(crawl_dir) if max_round is None or r.round_no <= max_round]
    if not rounds or rounds[0].round_no != 0:
        raise CrawlError(f"{crawl_dir}: not a clipline crawl directory (no round 0 URL list)")
    for r in rounds:
        if not r.complete:
            raise CrawlIncompleteError(f"{r.directory}: round {r.round_no} has {len(r.done_shards)} of "
                                       f"{r.n_shards} shards finished; rerun the crawl to finish it")
    inputs = storage.read_table(rounds[0].input_path)
    tables = [t for t in (_read_round_rows(crawl_dir, r) for r in rounds) if t is not None]
    rows = pa.concat_tables(tables, promote_options="permissive").to_pylist() if tables else []

    success: dict[str, dict] = {}
    latest_failure: dict[str, dict] = {}
    for row in sorted(rows, key=lambda x: (x["round"], x["key"])):
        uid = row["uid"]
        if row["status"] == "success":
            success.setdefault(uid, row)
        else:
            latest_failure[uid] = row

    ext = {r.round_no: load_round_config(crawl_dir, r.round_no).encode_format for r in rounds}
    ok_rows, fail_rows = [], []
    for cand in inputs.to_pylist():
        uid = cand["uid"]
        if uid in success:
            row = dict(success[uid])
            row["member"] = f"{row['key']}.{ext[row['round']]}"  # img2dataset names members key.encode_format
            ok_rows.append(row)
        elif uid in latest_failure:
            row = dict(latest_failure[uid])
            row["reason"] = row.get("reason") or normalise_reason(row.get("error_message"))
            fail_rows.append(row)
        else:
            fail_rows.append({**cand, "key": None, "round": 0, "tar": None, "parquet": None, "status": None,
                              "error_message": "not in the crawl's output", "reason": "missing_from_output"})

    successes = _table(ok_rows, SUCCESS_COLUMNS, inputs.schema)
    failures = _table(fail_rows, FAILURE_COLUMNS, inputs.schema)
    return CrawlOutcome(crawl_dir, successes, failures, Counter(failures.column("reason").to_pylist()))


def successful_records(crawl_dir: str) -> pa.Table:
    """One row per candidate that ended with an image: uid -> crawl_tar, jpg_offset/jpg_size of its member,
    source (crawl Parquet), sha256 of the published bytes (``img_sha256``), pHash/dHash, decoded size, and the
    carried candidate columns. For the images stage: no failure needs re-deriving."""
    return crawl_outcome(crawl_dir).successes


def host_report(crawl_dir: str, *, top: int = 20) -> dict:
    """Per-host figures summed over every finished shard of every round: ``hosts`` (the ``top`` hosts by
    requests, each with requests, downloaded, failures, http_429, http_5xx, timeouts, robots_disallowed,
    unavailable, pauses, seconds), ``n_hosts`` and the totals."""
    totals: dict[str, HostStats] = {}
    rounds_out = []
    for info in list_rounds(crawl_dir):
        stats = shard_stats(info)
        rounds_out.append({"round": info.round_no, "urls": info.n_rows, "shards": info.n_shards,
                           "finished_shards": len(info.done_shards),
                           "successes": sum(s.get("successes", 0) for s in stats),
                           "download_seconds": round(max((s["end_time"] for s in stats), default=0)
                                                     - min((s["start_time"] for s in stats), default=0), 3),
                           "worker_cpu_s": round(sum(s.get("worker_cpu_s", 0.0) for s in stats), 3),
                           "helper_cpu_s": round(sum(s.get("helper_cpu_s", 0.0) for s in stats), 3),
                           "shared_helper_cpu_s": round(sum(s.get("shared_helper_cpu_s", 0.0) for s in stats), 3),
                           "processed_in_thread": sum(s.get("processed_in_thread", 0) for s in stats),
                           "helper_deaths": sum(s.get("helper_deaths", 0) for s in stats)})
        for s in stats:
            for host, d in (s.get("hosts") or {}).items():
                totals.setdefault(host, HostStats()).add(HostStats(**{k: d.get(k, 0) for k in
                                                                      HostStats.__dataclass_fields__}))
    ordered = sorted(totals.items(), key=lambda kv: (-kv[1].requests, kv[0]))
    all_ = HostStats()
    for _, st in ordered:
        all_.add(st)
    return {"n_hosts": len(totals), "totals": all_.to_dict(), "rounds": rounds_out,
            "hosts": {h: st.to_dict() for h, st in ordered[:top]}}


SUCCESS_COLUMNS = ["uid", "key", "tar", "member", "url", "caption", "entry_ids", "width", "height",
                   "original_width", "original_height", "sha256", "round", "crawl_tar", "source", "jpg_offset",
                   "jpg_size", "img_sha256", "img_width", "img_height", "img_error", "phash", "dhash",
                   "fetch_seconds", "attempts", "host"]
FAILURE_COLUMNS = ["uid", "url", "caption", "entry_ids", "reason", "error_message", "status", "key", "round",
                   "parquet", "timeouts", "fetch_seconds", "attempts", "host"]
_TYPES = {"key": pa.string(), "tar": pa.string(), "member": pa.string(), "width": pa.int32(),
          "height": pa.int32(), "original_width": pa.int32(), "original_height": pa.int32(), "sha256": pa.string(),
          "round": pa.int32(), "reason": pa.string(), "error_message": pa.string(), "status": pa.string(),
          "parquet": pa.string(), "crawl_tar": pa.string(), "source": pa.string(), "jpg_offset": pa.int64(),
          "jpg_size": pa.int64(), "img_sha256": pa.string(), "img_width": pa.int32(), "img_height": pa.int32(),
          "img_error": pa.string(), "phash": pa.uint64(), "dhash": pa.uint64(), "fetch_seconds": pa.float32(),
          "attempts": pa.int32(), "timeouts": pa.int32(), "host": pa.string()}


def _table(rows: list[dict], first: list[str], input_schema: pa.Schema) -> pa.Table:
    """Rows -> table with ``first`` columns in order, then the other carried candidate columns."""
    carried = [f for f in input_schema if f.name not in first]
    fields = []
    for name in first:
        if name in input_schema.names:
            fields.append(input_schema.field(name))
        else:
            fields.append(pa.field(name, _TYPES[name]))
    fields += carried
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
