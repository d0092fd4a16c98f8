"""Candidate: a raw pair that passed curation (matched, filtered, with its count-derived keep probability)."""
import pyarrow as pa

from schemas import versioned

VERSION = 1
SCHEMA = versioned(
    "candidate",
    VERSION,
    [
        pa.field("uid", pa.string(), nullable=False),  # hex of a 128-bit hash of (url, caption)
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("entry_ids", pa.list_(pa.int32()), nullable=False),  # sorted ascending, unique
        pa.field("lang", pa.string()),
        pa.field("lang_score", pa.float32()),
        pa.field("keep_prob", pa.float64(), nullable=False),  # MetaCLIP: 1 - prod_e (1 - p_e)
    ],
)
