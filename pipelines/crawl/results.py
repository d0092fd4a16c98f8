"""Reading a finished crawl: one outcome per candidate, a success (where its image is, with the hashes computed in
the crawl) or a rejected row with a normalised reason; and the per-host report."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.table_ops import as_array, one_per_key
from pipelines.crawl.politeness import HostStats
from pipelines.crawl.reasons import normalise_reason
from pipelines.crawl.rounds import CrawlError, CrawlIncompleteError, RoundInfo, list_rounds, load_round_config
from schemas import conform
from schemas import rejected as rejected_schema

STAGE = "crawl"
T = TypeVar("T")
# Candidates per part of a crawl's outcome: ~1.5 KiB of Arrow per candidate while a part is decided (a few
# hundred MiB), and one pass of the re-crawl rounds' rows per part.
PART_ROWS = 500_000


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
        parquet = _column(f, "parquet", pa.string())
        in_shard = pc.binary_join_element_wise(pc.binary_join_element_wise(f"{STAGE}/", parquet, ""),
                                               _column(f, "key", pa.string()), ":")
        no_shard = pc.binary_join_element_wise(f"{STAGE}:", _column(f, "uid", pa.string()), "")
        table = pa.table({
            "uid": f.column("uid"),
            "url": f.column("url"),
            "caption": f.column("caption"),
            "stage": pa.array([STAGE] * f.num_rows, pa.string()),
            "reason": f.column("reason"),
            "source": pc.if_else(pc.is_valid(parquet), in_shard, no_shard),
        })
        return conform(table, rejected_schema.SCHEMA, where=f"{self.crawl_dir} crawl failures")

    @property
    def n_candidates(self) -> int:
        return self.successes.num_rows + self.failures.num_rows

    def iter_images(self) -> Iterator[tuple[dict, bytes]]:
        """Yield (success row, image bytes) for every success, in (tar, offset) order, reading each image by its
        recorded offset (or, for shards without offsets, by walking the tar once); one tar's rows at a time are
        Python objects."""
        import tarfile

        s = self.successes
        s = s.append_column("__offset", pc.fill_null(_column(s, "jpg_offset", pa.int64()), 0)).sort_by(
            [("crawl_tar", "ascending"), ("__offset", "ascending"), ("key", "ascending")]).drop_columns("__offset")
        tars = as_array(_column(s, "crawl_tar", pa.string()))
        n = len(tars)
        starts = [0] + ([i + 1 for i in pc.indices_nonzero(pc.fill_null(
            pc.not_equal(tars.slice(1), tars.slice(0, n - 1)), True)).to_pylist()] if n > 1 else [])
        for start, end in zip(starts, starts[1:] + [n]):
            if start >= end:
                continue
            group = s.slice(start, end - start).to_pylist()
            tar_uri = group[0]["crawl_tar"]
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


_WHERE = ("tar", "parquet", "crawl_tar", "source")  # where a row was read: per shard, added after the choice


def _read_round_rows(crawl_dir: str, info: RoundInfo, wanted: set[str] | None, shards: list[dict],
                     shard_ids: Iterable[int] | None = None) -> pa.Table | None:
    """A round's rows (of ``shard_ids``, default all) with ``round`` and ``__shard`` (an index into ``shards``,
    which gets each shard's :data:`_WHERE` values): four strings per shard rather than per row."""
    parts = []
    for shard_id in (info.done_shards if shard_ids is None else shard_ids):
        pq_uri, tar_uri = info.shard_uri(shard_id, ".parquet"), info.shard_uri(shard_id, ".tar")
        try:
            with storage.open_read(pq_uri) as f:
                pf = pq.ParquetFile(f)
                t = pf.read(columns=[c for c in pf.schema_arrow.names if wanted is None or c in wanted])
        except (OSError, pa.ArrowInvalid) as exc:
            raise CrawlError(f"{pq_uri}: unreadable crawl shard metadata ({exc})") from None
        t = t.drop_columns([c for c in ("round", "__shard", *_WHERE) if c in t.column_names])
        t = t.append_column("round", pa.array(np.full(t.num_rows, info.round_no, np.int32)))
        t = t.append_column("__shard", pa.array(np.full(t.num_rows, len(shards), np.int32)))
        shards.append({"tar": _relative(crawl_dir, tar_uri), "parquet": _relative(crawl_dir, pq_uri),
                       "crawl_tar": tar_uri, "source": pq_uri})
        parts.append(t)
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def _with_where(table: pa.Table, shards: list[dict]) -> pa.Table:
    """Replace ``__shard`` by the shard's :data:`_WHERE` columns."""
    idx = table.column("__shard")
    table = table.drop_columns("__shard")
    for name in _WHERE:
        table = table.append_column(name, pc.take(pa.array([s[name] for s in shards], pa.string()), idx))
    return table


def _uids(table: pa.Table) -> pa.Array:
    return as_array(table.column("uid")) if table.num_rows else pa.array([], pa.string())


def _one_per_uid(table: pa.Table, *, last: bool) -> pa.Table:
    return one_per_key(table, "uid", last=last)


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, type_)
    col = table.column(name)
    return col if col.type == type_ else col.cast(type_)


def _shaped(table: pa.Table, first: list[str], input_schema: pa.Schema) -> pa.Table:
    """``first`` columns in order, then the other carried candidate columns, typed as the candidates (or
    ``_TYPES``); a column the table lacks is null."""
    fields = [input_schema.field(n) if n in input_schema.names else pa.field(n, _TYPES[n]) for n in first]
    fields += [f for f in input_schema if f.name not in first]
    schema = pa.schema(fields)
    return pa.Table.from_arrays([_column(table, f.name, f.type) for f in schema], schema=schema)


def _reasons(failures: pa.Table) -> pa.Array:
    """Each failure's reason: the one the crawl recorded, else img2dataset's error message normalised (once per
    distinct message)."""
    reason = as_array(_column(failures, "reason", pa.string()))
    if reason.null_count == 0:
        return reason
    messages = as_array(_column(failures, "error_message", pa.string()))
    distinct = pc.unique(messages)
    normalised = pa.array([normalise_reason(m) for m in distinct.to_pylist()], pa.string())
    return pc.coalesce(reason, pc.take(normalised, pc.index_in(messages, value_set=distinct)))


class ShardLayoutError(CrawlError):
    """A round-0 shard holds a candidate of another shard's slice of the URL list (never in a crawl this package
    wrote): the outcome must then be decided over the whole crawl at once (``rows_per_part=None``)."""


def _finished_rounds(crawl_dir: str, max_round: int | None) -> list[RoundInfo]:
    rounds = [r for r in list_rounds(crawl_dir) if max_round is None or r.round_no <= max_round]
    if not rounds or rounds[0].round_no != 0:
        raise CrawlError(f"{crawl_dir}: not a clipline crawl directory (no round 0 URL list)")
    for r in rounds:
        if not r.complete:
            raise CrawlIncompleteError(f"{r.directory}: round {r.round_no} has {len(r.done_shards)} of "
                                       f"{r.n_shards} shards finished; rerun the crawl to finish it")
    return rounds


def _row_slices(uri: str, sizes: Iterable[int]) -> Iterator[pa.Table]:
    """Consecutive slices of a Parquet file's rows, of the given sizes, read as a stream."""
    with storage.open_read(uri) as f:
        pf = pq.ParquetFile(f)
        batches = pf.iter_batches(batch_size=65536)
        pending: list[pa.RecordBatch] = []
        have = 0
        for size in sizes:
            while have < size:
                batch = next(batches, None)
                if batch is None:
                    break
                pending.append(batch)
                have += batch.num_rows
            table = pa.Table.from_batches(pending, schema=pf.schema_arrow)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, have = rest.to_batches(), rest.num_rows


def iter_outcomes(crawl_dir: str, *, max_round: int | None = None,
                  rows_per_part: int | None = PART_ROWS) -> Iterator[CrawlOutcome]:
    """The outcome of every candidate of a crawl (rounds up to ``max_round``, default all), in parts: one per run of
    round-0 shards holding about ``rows_per_part`` candidates (None: one part), in the order of round 0's URL list.

    A candidate that succeeded in any round is a success (its earliest success); otherwise it is a failure with
    the reason of its latest attempt. Every candidate of round 0 gets exactly one outcome: one missing from the
    crawl's output is a failure ``missing_from_output``. Unfinished rounds raise CrawlIncompleteError.

    Round-0 shard i holds the candidates of slice i of round 0's URL list (img2dataset cuts the list in order), so a
    part needs its slice, its shards and the re-crawl rounds' rows of its candidates; memory follows the part and
    the re-crawl rounds, not the crawl. Computed column-wise in Arrow: the winners are chosen on a small table of
    (uid, round, key, status, row number), then the rows are taken once into the part's two tables. A shard that
    breaks the layout raises :class:`ShardLayoutError` after the last part (``crawl_outcome`` then decides over the
    whole crawl at once).
    """
    crawl_dir = str(crawl_dir)
    rounds = _finished_rounds(crawl_dir, max_round)
    first = rounds[0]
    with storage.open_read(first.input_path) as f:
        input_schema = pq.ParquetFile(f).schema_arrow
    wanted = set(SUCCESS_COLUMNS) | set(FAILURE_COLUMNS) | set(input_schema.names)
    configs = {r.round_no: load_round_config(crawl_dir, r.round_no) for r in rounds}
    ext = {n: c.encode_format for n, c in configs.items()}
    shards: list[dict] = []
    later = [t for t in (_read_round_rows(crawl_dir, r, wanted, shards) for r in rounds[1:]) if t is not None]
    later_rows = pa.concat_tables(later, promote_options="permissive") if later else None
    size = configs[0].number_sample_per_shard
    if rows_per_part is None or first.n_shards == 0:
        parts = [list(range(first.n_shards))]
    else:
        step = max(1, rows_per_part // size)
        parts = [list(range(a, min(a + step, first.n_shards))) for a in range(0, first.n_shards, step)]
    sizes = [min(len(ids) * size, first.n_rows - ids[0] * size) if ids else 0 for ids in parts]
    strays: list[pa.Array] = []
    for ids, inputs in zip(parts, _row_slices(first.input_path, sizes)):
        rows = _read_round_rows(crawl_dir, first, wanted, shards, ids)
        input_uids = _uids(inputs)
        if rows is not None and rows_per_part is not None:
            elsewhere = pc.invert(pc.is_in(rows.column("uid"), value_set=input_uids))
            if pc.any(elsewhere).as_py():
                strays.append(as_array(rows.column("uid").filter(elsewhere)))
        if later_rows is not None:
            mine = later_rows.filter(pc.is_in(later_rows.column("uid"), value_set=input_uids))
            rows = mine if rows is None else pa.concat_tables([rows, mine], promote_options="permissive")
        yield _decide(crawl_dir, inputs, rows, ext, shards)
    if strays:  # rows of no candidate are ignored; a candidate of another slice breaks the layout
        stray = pa.concat_arrays([a.cast(pa.string()) for a in strays])
        with storage.open_read(first.input_path) as f:
            uid_batches = pq.ParquetFile(f).iter_batches(batch_size=1 << 20, columns=["uid"])
            if any(pc.any(pc.is_in(b.column(0).cast(pa.string()), value_set=stray)).as_py() for b in uid_batches):
                raise ShardLayoutError(f"{crawl_dir}: a round-0 shard holds a candidate of another shard's part "
                                       f"of the URL list; decide the outcome over the whole crawl")


def map_outcomes(crawl_dir: str, fn: Callable[[CrawlOutcome], T], *, max_round: int | None = None) -> list[T]:
    """``fn`` of each part of :func:`iter_outcomes`, in order (over the whole crawl at once if a shard breaks the
    layout); only what ``fn`` keeps stays in memory."""
    try:
        return [fn(part) for part in iter_outcomes(crawl_dir, max_round=max_round)]
    except ShardLayoutError:
        return [fn(part) for part in iter_outcomes(crawl_dir, max_round=max_round, rows_per_part=None)]


def crawl_outcome(crawl_dir: str, *, max_round: int | None = None) -> CrawlOutcome:
    """The outcome of every candidate of a crawl as two whole tables (see :func:`iter_outcomes`; a reader of a large
    crawl should iterate its parts or use :func:`map_outcomes` instead)."""
    return merge_outcomes(str(crawl_dir), map_outcomes(str(crawl_dir), lambda part: part, max_round=max_round))


def merge_outcomes(crawl_dir: str, parts: list[CrawlOutcome]) -> CrawlOutcome:
    reasons: Counter = Counter()
    for p in parts:
        reasons.update(p.reasons)
    return CrawlOutcome(str(crawl_dir), pa.concat_tables([p.successes for p in parts]),
                        pa.concat_tables([p.failures for p in parts]), reasons)


def _decide(crawl_dir: str, inputs: pa.Table, rows: pa.Table | None, ext: dict[int, str],
            shards: list[dict]) -> CrawlOutcome:
    """One part's outcome: ``inputs`` (its slice of round 0's URL list) and every crawled row of its candidates."""
    input_uids = _uids(inputs)
    if rows is None or rows.num_rows == 0:
        rows = pa.table({"uid": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                         "round": pa.array([], pa.int32()), "key": pa.array([], pa.string()),
                         "__shard": pa.array([], pa.int32())})
    for needed in ("uid", "status", "key"):
        if needed not in rows.column_names:
            raise CrawlError(f"{crawl_dir}: crawl shards without a {needed!r} column; expected a clipline crawl")

    # Choose each candidate's row on (uid, round, key, success, row number) alone.
    order = [("uid", "ascending"), ("round", "ascending"), ("key", "ascending")]
    keys = pa.table({"uid": rows.column("uid"), "round": rows.column("round"), "key": rows.column("key"),
                     "ok": pc.fill_null(pc.equal(rows.column("status"), "success"), False),
                     "i": pa.array(np.arange(rows.num_rows, dtype=np.int64))})
    keys = keys.filter(pc.is_in(keys.column("uid"), value_set=input_uids))  # a row of no candidate is no outcome
    ok_keys = _one_per_uid(keys.filter(keys.column("ok")).sort_by(order), last=False)  # the earliest success
    failed_keys = keys.filter(pc.invert(keys.column("ok")))
    failed_keys = failed_keys.filter(pc.invert(pc.is_in(failed_keys.column("uid"), value_set=_uids(ok_keys))))
    failed_keys = _one_per_uid(failed_keys.sort_by(order), last=True)  # the latest failure
    del keys

    def in_input_order(k: pa.Table) -> tuple[pa.Array, pa.Array]:
        pos = pc.index_in(k.column("uid"), value_set=input_uids)
        by_pos = pc.sort_indices(pos)
        return pc.take(k.column("i"), by_pos), pc.take(pos, by_pos)

    ok_rows, _ = in_input_order(ok_keys)
    ok = _with_where(rows.take(ok_rows), shards)
    by_round = pa.array([ext.get(i, "") for i in range(max(ext) + 1)], pa.string())
    # img2dataset names members key.encode_format
    member = pc.binary_join_element_wise(_column(ok, "key", pa.string()),
                                         pc.take(by_round, _column(ok, "round", pa.int32())), ".")
    ok = ok.drop_columns([c for c in ("member",) if c in ok.column_names]).append_column("member", member)
    successes = _shaped(ok, SUCCESS_COLUMNS, inputs.schema)
    del ok

    failed_rows, failed_pos = in_input_order(failed_keys)
    failed = _with_where(rows.take(failed_rows), shards)
    del rows
    failed = failed.drop_columns([c for c in ("reason",) if c in failed.column_names]).append_column(
        "reason", _reasons(failed))
    seen = pa.concat_arrays([_uids(ok_keys).cast(input_uids.type), _uids(failed_keys).cast(input_uids.type)])
    missing_mask = pc.invert(pc.is_in(input_uids, value_set=seen))
    missing = inputs.filter(missing_mask)
    m = missing.num_rows
    for name, value, type_ in (("round", 0, pa.int32()), ("error_message", "not in the crawl's output", pa.string()),
                               ("reason", "missing_from_output", pa.string())):
        missing = missing.drop_columns([c for c in (name,) if c in missing.column_names]).append_column(
            name, pa.array([value] * m, type_))
    failures = pa.concat_tables([_shaped(t, FAILURE_COLUMNS, inputs.schema) for t in (failed, missing)])
    if m:  # merge the missing candidates into round 0's order
        positions = pa.chunked_array([as_array(failed_pos).cast(pa.int64()),
                                      as_array(pc.indices_nonzero(missing_mask)).cast(pa.int64())])
        failures = failures.take(pc.sort_indices(positions))
    reasons = pc.value_counts(failures.column("reason")).to_pylist() if failures.num_rows else []
    return CrawlOutcome(crawl_dir, successes, failures, Counter({d["values"]: d["counts"] for d in reasons}))


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
