"""Query list: the metadata entries that captions are matched against (CLIP's 500,000 queries)."""
import pyarrow as pa

from schemas import versioned

VERSION = 1
SCHEMA = versioned(
    "querylist",
    VERSION,
    [
        pa.field("entry_id", pa.int32(), nullable=False),  # dense from 0, in list order
        pa.field("entry", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # wordfreq | wordfreq_capitalized | wordnet | bigram_pmi | user:<file>
    ],
)
