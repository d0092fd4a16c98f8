"""Per-image decontamination results kept from one build to the next (dataset versions: ``ROOT/decontam_cache``).

Matching a pool image against the evaluation index depends only on the image's bytes, the evaluation sets' content
and the detector (its settings, the descriptor's weights, the code version): the namespace of the cache is the
fingerprint of all of those, and inside it an image is keyed by its sha256. A build looks every pool image up, matches
only the images it has not seen under the same namespace, and adds their results (matches, or none, or unreadable)
as one new Parquet part; an image's result is the same whether it came from the cache or was matched now, so a build
with a warm cache writes exactly the bytes of one without.

    CACHE/<namespace>/part-<hash of the part's sha256s>.parquet    sha256, unreadable, matches (JSON list)
    CACHE/<namespace>/index.npz                                    the evaluation-set index (built once)

Parts are written whole (temp + rename locally, one PUT on S3); a killed build leaves either a complete part or
none. One writer per cache at a time (the version flow holds the root).
"""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from pipelines.core import storage

SCHEMA = pa.schema([("sha256", pa.string()), ("unreadable", pa.bool_()), ("matches", pa.string())])


class DecontamCache:
    def __init__(self, uri: str, namespace: str):
        self.dir = storage.join(uri, namespace)
        self.index_uri = storage.join(self.dir, "index.npz")

    def load(self) -> dict[str, tuple[bool, list[dict]]]:
        """sha256 -> (unreadable, matches without pool_key) for every image recorded under this namespace."""
        out: dict[str, tuple[bool, list[dict]]] = {}
        try:
            parts = sorted(u for u in storage.list_prefix(self.dir) if u.endswith(".parquet"))
        except storage.StorageError:
            return out  # no cache yet
        for uri in parts:
            t = storage.read_table(uri)
            for sha, bad, matches in zip(t.column("sha256").to_pylist(), t.column("unreadable").to_pylist(),
                                         t.column("matches").to_pylist()):
                out[sha] = (bool(bad), json.loads(matches))
        return out

    def add(self, results: dict[str, tuple[bool, list[dict]]]) -> str | None:
        """Record results of newly matched images (sha256 -> (unreadable, matches without pool_key))."""
        if not results:
            return None
        shas = sorted(results)
        name = hashlib.sha256("\n".join(shas).encode()).hexdigest()[:24]
        table = pa.table({"sha256": shas, "unreadable": [results[s][0] for s in shas],
                          "matches": [json.dumps(results[s][1], sort_keys=True) for s in shas]}, schema=SCHEMA)
        uri = storage.join(self.dir, f"part-{name}.parquet")
        storage.write_table(uri, table)
        return uri
