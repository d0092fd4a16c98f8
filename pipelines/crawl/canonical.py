"""A finished crawl shard put in key order before it is published.

Download threads finish in whatever order the web answers, and the writer (like img2dataset's) appends samples as
they finish, so two crawls of the same URLs would give tars with the same members in different orders -- and the
pool, which records where each image lives (``jpg_offset``), would differ between runs and runners although every
image is the same. Rewriting the staged shard in key order (the order of the shard's URL list) makes the tar's
member layout and every ``jpg_offset`` a function of the outcomes only.

The rewrite streams: one pass over the staged tar's headers, then each member copied from its offset (a local file),
so memory does not grow with the shard. Within a sample the members keep their order (jpg, txt, json).
"""
from __future__ import annotations

import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import storage


def _sample_key(name: str) -> str:
    return name.split(".", 1)[0]


def put_in_key_order(tar_path: str, parquet_path: str, image_ext: str) -> None:
    """Rewrite a staged shard (tar + Parquet, local files) with samples in key order; the Parquet rows follow the
    same order and their ``jpg_offset`` / ``jpg_size`` point into the new tar."""
    with tarfile.open(tar_path) as src:
        members = src.getmembers()
    order = sorted(range(len(members)), key=lambda i: (_sample_key(members[i].name), i))
    offsets: dict[str, tuple[int, int]] = {}

    def fill(out) -> None:
        with open(tar_path, "rb") as raw, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
            for i in order:
                m = members[i]
                raw.seek(m.offset_data)
                dst.addfile(m, _Slice(raw, m.size))
                if m.name.endswith("." + image_ext):  # its data ends the written part, padded to a block
                    offsets[_sample_key(m.name)] = (dst.offset - _padded(m.size), m.size)

    storage.write_stream_atomic(tar_path, fill)  # the new tar replaces the staged one whole
    table = pq.read_table(parquet_path)
    if "key" in table.column_names and table.num_rows:
        table = table.take(pa.array(sorted(range(table.num_rows), key=table.column("key").to_pylist().__getitem__)))
        if "jpg_offset" in table.column_names:
            keys = table.column("key").to_pylist()
            found = [offsets.get(k) for k in keys]
            i_off = table.schema.get_field_index("jpg_offset")
            i_size = table.schema.get_field_index("jpg_size")
            table = table.set_column(i_off, table.schema.field(i_off),
                                     pa.array([f[0] if f else None for f in found], table.schema.field(i_off).type))
            table = table.set_column(i_size, table.schema.field(i_size),
                                     pa.array([f[1] if f else None for f in found], table.schema.field(i_size).type))
    storage.write_table(parquet_path, table)


class _Slice:
    """``size`` bytes of ``f`` from its current position, as a file object for ``TarFile.addfile``."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _padded(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
