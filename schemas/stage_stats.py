"""Stage statistics (stats.json): the funnel of a stage, counts per step and per reject reason.

Stored as JSON; this schema is its tabular form (one row per stage run) so funnels of many runs can be
concatenated and compared, and ``validate_stats`` checks a stats dict before it is written.
"""
import pyarrow as pa

from schemas import versioned

VERSION = 1
SCHEMA = versioned(
    "stage_stats",
    VERSION,
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("input_rows", pa.int64(), nullable=False),
        pa.field("kept", pa.int64(), nullable=False),
        pa.field("rejected", pa.map_(pa.string(), pa.int64()), nullable=False),
        pa.field("steps", pa.list_(pa.struct([("step", pa.string()), ("rows_in", pa.int64()), ("rows_out", pa.int64())]))),
        pa.field("params", pa.string()),  # JSON of every parameter and seed
    ],
)


def validate_stats(stats: dict) -> None:
    """Raise ValueError unless the funnel adds up: input_rows == kept + sum(rejected)."""
    for key in ("input_rows", "kept", "rejected"):
        if key not in stats:
            raise ValueError(f"stats: missing {key!r}")
    total = stats["kept"] + sum(stats["rejected"].values())
    if total != stats["input_rows"]:
        raise ValueError(f"stats: funnel does not add up: kept {stats['kept']} + rejected "
                         f"{sum(stats['rejected'].values())} != input_rows {stats['input_rows']}")
    pa.Table.from_pylist([{"stage": stats.get("stage", "?"), "input_rows": stats["input_rows"], "kept": stats["kept"],
                           "rejected": list(stats["rejected"].items()), "steps": stats.get("steps"),
                           "params": None}], schema=SCHEMA)
