"""A finished crawl shard published in key order.

Download threads finish in whatever order the web answers, and the writer (like img2dataset's) appends samples as
they finish, so two crawls of the same URLs would give tars with the same members in different orders -- and the
pool, which records where each image lives (``jpg_offset``), would differ between runs and runners although every
image is the same. Publishing the staged shard in key order (the order of the shard's URL list) makes the tar's
member layout and every ``jpg_offset`` a function of the outcomes only.

The writer records where each sample's members lie in the staged tar (:class:`~pipelines.crawl.worker.
CrawlShardWriter`), so publishing copies each sample's bytes (headers, data, padding: a tar header holds no offset)
in key order, then the end-of-archive blocks: the same bytes as a tar written in key order in the first place,
with no tar parsing and no second local copy. Memory holds one sample at a time plus a 1 MiB write buffer.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping

from pipelines.core import storage

WRITE_CHUNK = 1 << 20  # few large writes: each write releases and retakes the GIL the download threads share


def key_order_layout(extents: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Each sample's start in the key-ordered tar; ``extents``: key -> (start, end) in the staged tar."""
    pos, layout = 0, {}
    for key in sorted(extents):
        start, end = extents[key]
        layout[key] = pos
        pos += end - start
    return layout


def publish_in_key_order(staged_tar: str, extents: Mapping[str, tuple[int, int]], uri: str) -> dict[str, int]:
    """Write the staged tar (local, samples in arrival order) to ``uri`` (local or s3://, atomically) with its
    samples in key order; returns each sample's start in the published tar."""
    members_end = max((end for _start, end in extents.values()), default=0)

    def fill(out) -> None:
        buf = bytearray()
        with open(staged_tar, "rb") as raw:
            for key in sorted(extents):
                start, end = extents[key]
                raw.seek(start)
                buf += raw.read(end - start)
                if len(buf) >= WRITE_CHUNK:
                    out.write(buf)
                    buf.clear()
            out.write(buf)
            raw.seek(members_end)  # the end-of-archive blocks, as the writer wrote them
            shutil.copyfileobj(raw, out, WRITE_CHUNK)

    storage.write_stream_atomic(uri, fill)
    return key_order_layout(extents)
