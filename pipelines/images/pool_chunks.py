"""Run a DoFn over a pool's ``ok`` rows in chunks, on any Beam runner: the pattern of the stages that need every
pool image once (decontamination, CLIP-score filtering).

The pool's rows travel as metadata (uid, crawl tar, offset, size: ~150 bytes a row), grouped by crawl tar and cut
into chunks in offset order (each tar is read sequentially by one worker), so a worker holds one chunk of decoded
images at a time and the driver only what the DoFn emits per chunk (small summaries). Chunks are the same on every
runner, so per-chunk results are too.
"""
from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam

from pipelines.core import storage

ROW_COLUMNS = ("uid", "sha256", "crawl_tar", "jpg_offset", "jpg_size")


def ok_rows(uri: str, columns: Sequence[str] = ROW_COLUMNS, exclude: frozenset = frozenset()) -> list[dict]:
    """The ``ok`` rows of one pool file (only ``columns``), leaving out uids in ``exclude``."""
    from pipelines.images.stage import read_rows

    cols = list(dict.fromkeys([*columns, "status"]))
    return [{k: r[k] for k in columns} for r in read_rows([uri], columns=cols)
            if r["status"] == "ok" and r["uid"] not in exclude]


def chunks_of_tar(kv, size: int):
    """Rows of one crawl tar, in offset order, cut into chunks of ``size``."""
    _tar, rows = kv
    rows = sorted(rows, key=lambda r: (int(r["jpg_offset"]), r["uid"]))
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def excluded_uids(uris: Sequence[str]) -> frozenset:
    """The uids listed in Parquet files with a ``uid`` column (drop lists of earlier stages)."""
    out: set[str] = set()
    for uri in uris:
        out.update(storage.read_table(uri, columns=["uid"]).column("uid").to_pylist())
    return frozenset(out)


def map_pool_chunks(files: Sequence[str], dofn: beam.DoFn, *, summary_uri: str, beam_args: Sequence[str] = (),
                    chunk_rows: int = 1024, columns: Sequence[str] = ROW_COLUMNS,
                    exclude: frozenset = frozenset()) -> list:
    """Apply ``dofn`` to every chunk of the pool files' ok rows; returns what it emitted, one item per chunk
    (gathered through ``summary_uri``, a JSON file written once by the pipeline and deleted after reading)."""
    from pipelines.images.stage import pipeline_options

    columns = list(dict.fromkeys([*ROW_COLUMNS, *columns]))
    with beam.Pipeline(options=pipeline_options(beam_args)) as p:
        _ = (p
             | "PoolFiles" >> beam.Create(list(files))
             | "OkRows" >> beam.FlatMap(ok_rows, columns, exclude)
             | "ByTar" >> beam.Map(lambda r: (r["crawl_tar"], r))
             | "GroupTar" >> beam.GroupByKey()
             | "Chunks" >> beam.FlatMap(chunks_of_tar, chunk_rows)
             | "PerChunk" >> beam.ParDo(dofn)
             | "All" >> beam.combiners.ToList()
             | "Write" >> beam.Map(lambda parts: storage.write_json(summary_uri, parts, indent=None)))
    parts = storage.read_json(summary_uri)
    storage.delete(summary_uri)
    return parts
