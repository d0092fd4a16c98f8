"""A round's URL list from candidate files, built in parts so that the driver never holds more than one part.

A list of at most ``part_rows`` candidates is built whole, as it always was: every row read, sorted by uid,
duplicate uids refused, each host's URLs spread over the list (:func:`pipelines.crawl.host_order.spread_hosts`).

A longer list (a pool of hundreds of millions of candidates) is built in P = ceil(rows / part_rows) parts, each a
range of uids, in three passes over the candidate files, one Parquet record batch at a time:

1. the uid column only: a regular sample of the uids, whose quantiles bound the P ranges;
2. every column: each batch's rows are sorted by uid and cut at the bounds (binary search), and each piece is
   appended to its part's temporary Parquet file (local, in ``tmp_dir``);
3. part by part, in uid order: the part is read whole (about ``part_rows`` rows), sorted by uid, checked for
   duplicate uids (all copies of a uid fall in one part), its hosts spread, and appended to the round's list as
   row groups.

The list is in uid order across parts, and each host's URLs are spread within each part (a part holds
``part_rows / number_sample_per_shard`` shards: the spreading works within a part as it does within a whole
list). Peak memory: one part (a few hundred bytes a row, a few copies of it while sorting), not the pool. The same
candidates and ``part_rows`` give the same bytes, so a resumed round checks its list by comparing it batch by
batch (:func:`same_list`). The crawl processes read the list in parts too (:func:`split_for_reader`).
"""
from __future__ import annotations

import bisect
import math
import os
import shutil
import tempfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.crawl.host_order import spread_hosts
from pipelines.crawl.rounds import CrawlError
from schemas import SchemaError, conform, schema_id
from schemas import candidate as candidate_schema

BATCH_ROWS = 262_144  # rows per record batch read from a candidate file
SAMPLE_PER_PART = 2_000  # uids sampled per part to place the bounds (more: parts closer to equal sizes)


def _unreadable(uri: str, exc: BaseException, where: str = "") -> CrawlError:
    return CrawlError(f"{uri}: not a readable Parquet file{where} ({' '.join(str(exc).split())[:200]})")


def count_rows(files: list[str]) -> int:
    """Rows of the candidate files, from their Parquet footers (no data read)."""
    total = 0
    for f in files:
        try:
            with storage.open_read(f) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise _unreadable(f, exc) from None
    return total


def _batches(files: list[str], columns: list[str] | None = None) -> Iterator[tuple[str, int, pa.Table]]:
    """(file, first row, table) per record batch of every file, in file order."""
    for f in files:
        start = 0
        try:
            with storage.open_read(f) as fh:
                pf = pq.ParquetFile(fh)
                cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                    yield f, start, pa.Table.from_batches([batch])
                    start += batch.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise _unreadable(f, exc, f" (after row {start})" if start else "") from None


def _conformed(f: str, start: int, table: pa.Table) -> pa.Table:
    try:
        return conform(table, candidate_schema.SCHEMA, where=f"{f} (rows {start}-{start + table.num_rows - 1})")
    except SchemaError as exc:
        raise CrawlError(str(exc)) from None


def _bounds(files: list[str], n_rows: int, parts: int) -> list[str]:
    """The parts - 1 uids that cut the candidates into ``parts`` ranges of about equal size (pass 1)."""
    step = max(1, n_rows // (parts * SAMPLE_PER_PART))
    sample: list[str] = []
    offset = 0  # position in the whole list of the batch's first row: every step-th row of the list is sampled
    for f, start, table in _batches(files, ["uid"]):
        if "uid" not in table.column_names:
            raise CrawlError(f"{f}: missing required column 'uid' ({schema_id(candidate_schema.SCHEMA)})")
        first = (-offset) % step
        sample.extend(u for u in table.column("uid").slice(first).to_pylist()[::step] if u is not None)
        offset += table.num_rows
    sample.sort()
    return sorted({sample[len(sample) * i // parts] for i in range(1, parts)}) if sample else []


def _bisect(sorted_uids: pa.Array, uid: str) -> int:
    return bisect.bisect_left(sorted_uids, uid, key=lambda s: s.as_py())


def _duplicates(table: pa.Table) -> tuple[int, str | None]:
    counts = pc.value_counts(table.column("uid"))
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if not len(dupes):
        return 0, None
    return len(dupes), min(dupes.field("values").to_pylist())


def duplicate_error(n: int, first: str) -> CrawlError:
    return CrawlError(f"candidates hold {n} duplicate uids (first: {first!r}); curation emits each (url, caption) "
                      f"pair once")


def ordered(table: pa.Table, columns: list[str], prior_timeouts: pa.Array | None = None) -> pa.Table:
    """``table`` (in uid order) as a URL list: ``columns``, then ``prior_timeouts`` when given, each host's URLs
    spread evenly over it."""
    out = table.select(columns).replace_schema_metadata(None)
    if prior_timeouts is not None:
        out = out.append_column("prior_timeouts", prior_timeouts)
    return out.take(pa.array(spread_hosts(out.column("url")), pa.int64()))


def write_parted(files: list[str], uri: str, columns: list[str], *, part_rows: int, n_rows: int | None = None,
                 tmp_dir: str | None = None, candidates: bool = True) -> int:
    """Write the URL list of the candidate ``files`` to ``uri`` in parts of about ``part_rows`` rows (see the
    module's docstring); returns the number of parts. Raises :class:`CrawlError` for an unreadable file, a file
    that does not fit the candidate schema (naming its rows) or duplicate uids; ``uri`` is then not written.
    ``candidates=False``: the files are the crawl's own tables (a re-crawl round's failures), taken as they are."""
    n_rows = count_rows(files) if n_rows is None else n_rows
    parts = max(1, math.ceil(n_rows / part_rows))
    bounds = _bounds(files, n_rows, parts)
    parts = len(bounds) + 1
    work = tempfile.mkdtemp(prefix="clipline-url-list-", dir=tmp_dir)
    writers: dict[int, pq.ParquetWriter] = {}
    closed = False
    try:
        schema = None
        for f, start, table in _batches(files):
            table = _conformed(f, start, table) if candidates else table
            schema = schema or table.schema
            if table.schema != schema:
                table = table.cast(schema)
            table = table.take(pc.sort_indices(table, sort_keys=[("uid", "ascending")]))
            uids = table.column("uid").combine_chunks()
            cuts = [0] + [_bisect(uids, b) for b in bounds] + [table.num_rows]
            for p in range(parts):
                if cuts[p + 1] > cuts[p]:
                    if p not in writers:
                        writers[p] = pq.ParquetWriter(os.path.join(work, f"{p:05d}.parquet"), schema)
                    writers[p].write_table(table.slice(cuts[p], cuts[p + 1] - cuts[p]))
        for w in writers.values():
            w.close()
        closed = True

        def fill(out) -> None:
            writer = None
            dupes, first = 0, None
            for p in sorted(writers):
                part = pq.read_table(os.path.join(work, f"{p:05d}.parquet")).sort_by("uid")
                n, f = _duplicates(part)
                if n:
                    dupes, first = dupes + n, first or f
                    continue
                if dupes:
                    continue
                piece = ordered(part, columns)
                writer = writer or pq.ParquetWriter(out, piece.schema, compression="zstd")
                writer.write_table(piece, row_group_size=BATCH_ROWS)
                os.remove(os.path.join(work, f"{p:05d}.parquet"))
            if dupes:
                raise duplicate_error(dupes, first)
            if writer is None:  # no rows at all
                empty = ordered((schema or candidate_schema.SCHEMA).empty_table(), columns)
                writer = pq.ParquetWriter(out, empty.schema, compression="zstd")
                writer.write_table(empty)
            writer.close()

        storage.write_stream_atomic(uri, fill)
    finally:
        if not closed:  # a file failed part-way through pass 2: the open part files are closed, then removed
            for w in writers.values():
                try:
                    w.close()
                except (OSError, pa.ArrowException):
                    pass
        shutil.rmtree(work, ignore_errors=True)
    return parts


def same_list(a: str, b: str) -> bool:
    """Whether the URL lists at ``a`` and ``b`` hold the same rows in the same order (read batch by batch, wherever
    their row groups end)."""
    with storage.open_read(a) as ha, storage.open_read(b) as hb:
        fa, fb = pq.ParquetFile(ha), pq.ParquetFile(hb)
        if fa.metadata.num_rows != fb.metadata.num_rows or fa.schema_arrow != fb.schema_arrow:
            return False
        ia, ib = fa.iter_batches(batch_size=BATCH_ROWS), fb.iter_batches(batch_size=BATCH_ROWS)
        x = y = None
        while True:
            if x is None or not x.num_rows:
                x = next(ia, None)
            if y is None or not y.num_rows:
                y = next(ib, None)
            if x is None or y is None:
                return x is None and y is None
            n = min(x.num_rows, y.num_rows)
            if not x.slice(0, n).equals(y.slice(0, n)):
                return False
            x, y = x.slice(n), y.slice(n)


def split_for_reader(local_list: str, out_dir: str, rows_per_file: int) -> str:
    """Cut the local URL list into files of ``rows_per_file`` rows (a multiple of the shard size), read one at a
    time by img2dataset's Reader, which reads each input file whole and numbers the shards on across files (the
    same shard ids as the whole list). Returns what to give the Reader: the list itself when it is one file's
    worth, else ``out_dir``."""
    pf = pq.ParquetFile(local_list)
    if pf.metadata.num_rows <= rows_per_file:
        return local_list
    os.makedirs(out_dir, exist_ok=True)
    index, buffered, pending = 0, 0, []
    writer_schema = pf.schema_arrow

    def flush(tables: list[pa.Table]) -> None:
        nonlocal index
        pq.write_table(pa.concat_tables(tables), os.path.join(out_dir, f"{index:06d}.parquet"))
        index += 1

    for batch in pf.iter_batches(batch_size=min(BATCH_ROWS, rows_per_file)):
        table = pa.Table.from_batches([batch], schema=writer_schema)
        while table.num_rows:
            take = min(rows_per_file - buffered, table.num_rows)
            pending.append(table.slice(0, take))
            buffered += take
            table = table.slice(take)
            if buffered == rows_per_file:
                flush(pending)
                pending, buffered = [], 0
    if pending:
        flush(pending)
    return out_dir

