"""Shared by the crawl tests: a candidates file for a list of URLs."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq


def write_candidates(urls: list[str], path) -> None:
    """Candidate rows (schemas.candidate's columns) for ``urls``, uid = a hash of the URL, written to ``path``."""
    rows = [{"uid": hashlib.sha256(u.encode()).hexdigest()[:32], "url": u, "caption": f"a picture {i}",
             "entry_ids": [1], "lang": "en", "lang_score": 1.0, "keep_prob": 1.0} for i, u in enumerate(urls)]
    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                        ("entry_ids", pa.list_(pa.int32())), ("lang", pa.string()), ("lang_score", pa.float32()),
                        ("keep_prob", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema), path)
