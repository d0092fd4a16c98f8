"""Read img2dataset's webdataset output (``NNNNN.tar`` + ``NNNNN.parquet``) into one record per crawled row.

Every row of a shard's Parquet comes out exactly once: successful downloads with where the bytes live in the tar
(``crawl_tar``, ``jpg_offset``, ``jpg_size``, so the resharder can read them back by range), failed downloads with
img2dataset's ``status`` / ``error_message``.

A clipline crawl computes each published image's sha256, pHash, dHash and decoded size in the crawl worker, where
the image was just encoded, and writes them as Parquet columns with the member's offset (see
``pipelines.crawl.worker``). For such shards the tar is not read at all: a success record carries those values as
``crawl_hashes`` and ``image`` = None. For plain img2dataset output the tar is read and a success record carries
the ``image`` bytes; one whose image is missing from the tar comes out with ``image`` = None and no
``crawl_hashes``, so the checks reject it with a reason instead of losing it.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.errors import ClipError
from pipelines.core import storage
from pipelines.core.table_ops import one_per_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Columns img2dataset writes that a record carries on (plus whatever extra columns the crawl kept).
_CARRIED = ("uid", "key", "url", "caption", "entry_ids", "status", "error_message", "width", "height",
            "original_width", "original_height")


# Columns a clipline crawl computes per success (pipelines.crawl.worker.EXTRA_COLUMNS).
HASH_COLUMNS = ("img_sha256", "img_width", "img_height", "img_error", "phash", "dhash", "jpg_offset", "jpg_size")


class CrawlFormatError(ClipError, ValueError):
    """The crawl directory does not hold img2dataset webdataset output as expected."""


def crawl_shards(crawl_dir: str) -> list[tuple[str, str]]:
    """(parquet, tar) URI pairs of a crawl directory, in round then shard order.

    A crawl made by ``pipelines.crawl`` has rounds (round 0 in CRAWL/, re-crawls of failures in
    CRAWL/recrawl-NNN/); every finished shard of every round is listed. A plain img2dataset output directory
    (no rounds) lists its NNNNN.parquet files; a Parquet without its tar is still listed.
    """
    return [(pq_uri, tar_uri) for _r, pq_uri, tar_uri in crawl_shards_by_round(crawl_dir)]


def crawl_shards_by_round(crawl_dir: str) -> list[tuple[int | None, str, str]]:
    """(round, parquet, tar) of every shard, as :func:`crawl_shards`; round is None in a plain img2dataset
    directory (no rounds, and nothing says its uids are unique)."""
    from pipelines.crawl.rounds import crawl_shard_files

    found = crawl_shard_files(crawl_dir)
    if found:
        return found
    parquets = [u for u in storage.expand([storage.join(crawl_dir, "*.parquet")], missing_ok=True)
                if storage.basename(u)[:-len(".parquet")].isdigit()]
    if not parquets:
        raise CrawlFormatError(f"{crawl_dir}: no img2dataset shard (NNNNN.parquet) found")
    return [(None, p, p[: -len(".parquet")] + ".tar") for p in parquets]


def _uid_status(parquet_uri: str) -> pa.Table:
    with storage.open_read(parquet_uri) as f:
        return pq.read_table(f, columns=["uid", "status"])


def final_outcomes(pairs: list[tuple[str, str]], rounds: list[int] | None = None) -> dict[str, str]:
    """uid -> the crawl Parquet holding its final outcome (the first success over the rounds, else the latest
    failure), for the uids found in more than one shard (re-crawled after a failure); a uid found once is final
    where it is and is left out, so the map that every reading worker gets stays the size of the re-crawls, not
    of the crawl.

    With ``rounds`` (each pair's round), only the uids of the re-crawl rounds can repeat: round 0's shards are read
    for those uids alone, so memory follows the re-crawls. Without it, every uid is a candidate (a plain
    img2dataset directory): its uids are held as one Arrow column, not as Python objects."""
    candidates, read = None, {}
    if rounds is not None:
        first = min(rounds, default=0)
        read = {i: _uid_status(p) for i, ((p, _t), r) in enumerate(zip(pairs, rounds)) if r != first}
        if not read:
            return {}
        candidates = pc.unique(pa.chunked_array([c for t in read.values() for c in t.column("uid").chunks],
                                                pa.string()))
    parts, pending = [], []

    def keep_candidates():  # one set lookup per ~1M rows: the lookup's hash table is built once per call
        t = pa.concat_tables(pending)
        pending.clear()
        uid = t.column("uid")
        parts.append(t.filter(pc.is_valid(uid) if candidates is None else pc.is_in(uid, value_set=candidates)))

    for i, (parquet_uri, _tar) in enumerate(pairs):
        t = read.pop(i) if i in read else _uid_status(parquet_uri)
        pending.append(pa.table({"uid": t.column("uid").cast(pa.string()),
                                 "status": t.column("status").cast(pa.string()),
                                 "shard": pa.array(np.full(t.num_rows, i, np.int32))}))
        if sum(p.num_rows for p in pending) >= 1_000_000:
            keep_candidates()
    if pending:
        keep_candidates()
    rows = pa.concat_tables(parts) if parts else None
    if rows is None or rows.num_rows == 0:
        return {}
    counts = rows.group_by("uid").aggregate([("shard", "count")])
    rows = rows.filter(pc.is_in(rows.column("uid"), value_set=counts.filter(
        pc.greater(counts.column("shard_count"), 1)).column("uid")))
    # The first success over the shards, else the latest failure.
    ok = pc.fill_null(pc.equal(rows.column("status"), "success"), False)
    order = [("uid", "ascending"), ("shard", "ascending")]
    won = one_per_key(rows.filter(ok).sort_by(order), "uid")
    failed = rows.filter(pc.invert(ok))
    failed = failed.filter(pc.invert(pc.is_in(failed.column("uid"), value_set=won.column("uid"))))
    lost = one_per_key(failed.sort_by(order), "uid", last=True)
    uris = [p for p, _t in pairs]
    return {uid: uris[shard] for t in (won, lost)
            for uid, shard in zip(t.column("uid").to_pylist(), t.column("shard").to_pylist())}


def _read_rows(parquet_uri: str) -> list[dict]:
    with storage.open_read(parquet_uri) as f:
        table = pq.read_table(f)
    missing = [c for c in ("key", "status", "url") if c not in table.column_names]
    if missing:
        raise CrawlFormatError(f"{parquet_uri}: missing column(s) {missing}; expected img2dataset's output")
    if "uid" not in table.column_names:
        raise CrawlFormatError(f"{parquet_uri}: no 'uid' column; the crawl must carry uid as an extra column")
    return table.to_pylist()


def _tar_images(tar_uri: str) -> dict[str, tuple[bytes, int, int]]:
    """key -> (image bytes, data offset, size) of a tar's image members (streamed, one pass)."""
    out: dict[str, tuple[bytes, int, int]] = {}
    if not storage.exists(tar_uri):
        return out
    with storage.open_read(tar_uri) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            if ext.lower() in IMAGE_EXTS:
                data = tar.extractfile(member).read()
                out[key] = (data, member.offset_data, member.size)
    return out


def read_crawl_shard(pair: tuple[str, str], outcomes: dict[str, str] | None = None) -> Iterator[dict]:
    """Records of one crawl shard, in its Parquet's row order; with ``outcomes`` (see :func:`final_outcomes`)
    only the rows whose final outcome is in this shard (a uid it does not name is final where it is)."""
    parquet_uri, tar_uri = pair
    rows = _read_rows(parquet_uri)
    if outcomes is not None:
        rows = [r for r in rows if outcomes.get(r["uid"], parquet_uri) == parquet_uri]
    successes = [r for r in rows if r.get("status") == "success"]
    precomputed = bool(successes) and all(r.get("img_sha256") is not None and r.get("jpg_offset") is not None
                                          for r in successes)
    images = _tar_images(tar_uri) if successes and not precomputed else {}
    for row in rows:
        rec = {c: row.get(c) for c in _CARRIED}
        rec["entry_ids"] = sorted(int(e) for e in (row.get("entry_ids") or []))
        rec["source"] = parquet_uri
        rec["crawl_tar"] = tar_uri
        if row.get("status") == "success" and precomputed:
            rec["image"], rec["jpg_offset"], rec["jpg_size"] = None, row["jpg_offset"], row["jpg_size"]
            rec["crawl_hashes"] = {c: row.get(c) for c in HASH_COLUMNS}
            yield rec
            continue
        found = images.get(row["key"]) if row.get("status") == "success" else None
        if found is None:
            rec["image"], rec["jpg_offset"], rec["jpg_size"] = None, None, None
        else:
            rec["image"], rec["jpg_offset"], rec["jpg_size"] = found
        yield rec


def read_image(rec: dict) -> bytes:
    """The image bytes of a record that carries ``crawl_hashes`` instead (one ranged read of its tar)."""
    with storage.open_read(rec["crawl_tar"]) as f:
        f.seek(int(rec["jpg_offset"]))
        return f.read(int(rec["jpg_size"]))
