"""Sample: one crawled row of the pool after image checks and dedup (hashes as columns, status and reason).

Every row img2dataset reported is here once: ``status`` is ``ok`` (goes on to decontamination and balancing),
``rejected`` (image checks / dedup, with ``stage`` and ``reason``) or ``failed`` (the crawl could not fetch it).
``phash``/``dhash`` are imagehash's 64 bits as uint64 (first bit most significant, ``int(str(h), 16)``).
The image bytes stay in the crawl tar at (``crawl_tar``, ``jpg_offset``, ``jpg_size``); the resharder reads them
from there and checks them against ``sha256``.
"""
import pyarrow as pa

from schemas import versioned

VERSION = 1
STATUSES = ("ok", "rejected", "failed")
SCHEMA = versioned(
    "sample",
    VERSION,
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),  # img2dataset's key in the crawl shard
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("entry_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | rejected | failed
        pa.field("stage", pa.string()),  # crawl | images | dedup (null when ok)
        pa.field("reason", pa.string()),  # null when ok
        pa.field("duplicate_of", pa.string()),  # uid kept in its place (exact / near duplicates)
        pa.field("sha256", pa.string()),
        pa.field("phash", pa.uint64()),
        pa.field("dhash", pa.uint64()),
        pa.field("width", pa.int32()),  # decoded (as crawled, after img2dataset's resize)
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("crawl_tar", pa.string()),
        pa.field("jpg_offset", pa.int64()),
        pa.field("jpg_size", pa.int64()),
        pa.field("source", pa.string()),  # crawl Parquet the row came from
    ],
)

# One row per sample of a final shard (SHARDS/NNNNN.parquet), in the shard's tar order.
SHARD_VERSION = 1
SHARD_SCHEMA = versioned(
    "shard_sample",
    SHARD_VERSION,
    [
        pa.field("key", pa.string(), nullable=False),  # the tar member stem: {key}.jpg / .txt / .json
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("entry_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("phash", pa.uint64()),
        pa.field("dhash", pa.uint64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
    ],
)
