"""Rejected row: any input row that did not go on, with the stage that dropped it and why."""
import pyarrow as pa

from schemas import versioned

VERSION = 1
SCHEMA = versioned(
    "rejected",
    VERSION,
    [
        pa.field("uid", pa.string()),  # null when the row had no url/caption to hash
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # curate | crawl | images | dedup | decontam | clip_score | balance
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source", pa.string()),  # input file (and row) the record came from, when known
    ],
)
