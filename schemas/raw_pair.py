"""Raw pair: one (image URL, caption) row as read from an input list, with where it came from."""
import pyarrow as pa

from schemas import versioned

VERSION = 1
SCHEMA = versioned(
    "raw_pair",
    VERSION,
    [
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string()),  # "<file>:<row>" (1-based data row)
    ],
)
