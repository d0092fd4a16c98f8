"""Eval match: a pool/dataset image found to be a near-duplicate of an evaluation example (decontam/matches.parquet)."""
import pyarrow as pa

from schemas import versioned

VERSION = 1
SCHEMA = versioned(
    "eval_match",
    VERSION,
    [
        pa.field("eval_set", pa.string(), nullable=False),
        pa.field("eval_id", pa.string(), nullable=False),
        pa.field("pool_key", pa.string(), nullable=False),  # pool uid, or a dataset key in an audit
        pa.field("distance", pa.int32(), nullable=False),  # pHash Hamming distance of the matched variant pair
        pa.field("variant", pa.string(), nullable=False),  # "<query variant>~<eval variant>"
        pa.field("ncc", pa.float32()),  # grey-level correlation after re-alignment
        pa.field("gncc", pa.float32()),  # gradient correlation after re-alignment
    ],
)
