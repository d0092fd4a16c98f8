"""Entry counts: how many pairs of a pool matched each query-list entry."""
import pyarrow as pa

from schemas import versioned

VERSION = 1
SCHEMA = versioned(
    "entry_counts",
    VERSION,
    [
        pa.field("entry_id", pa.int32(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
    ],
)
