"""Column-wise helpers on pyarrow tables, for readers that must keep one row per key without a Python object per
row (crawl outcomes over rounds, the images stage's re-crawled uids)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def one_per_key(table: pa.Table, key: str, *, last: bool = False) -> pa.Table:
    """The first (or, with ``last``, the last) row of each run of equal ``key`` values: on a table sorted by
    ``key`` (then by whatever decides which row wins), one row per key."""
    n = table.num_rows
    if n < 2:
        return table
    values = as_array(table.column(key))
    change = pc.fill_null(pc.not_equal(values.slice(1), values.slice(0, n - 1)), True)
    edge = pa.array([True])
    return table.filter(pa.concat_arrays([change, edge] if last else [edge, change]))
