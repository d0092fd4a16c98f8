"""MetaCLIP's online balancing for training: a new balanced subset of the pool every epoch.

MetaCLIP ("Demystifying CLIP Data", section 3.4 and its ablation) draws the balanced subset once per epoch from the
full pool instead of once for the dataset: head entries contribute different pairs each epoch, so over the epochs the
model sees more of the head's diversity while each epoch keeps the balanced distribution (66.1 vs 65.5 ImageNet
zero-shot in their ablation).

The draw is the build's (:mod:`pipelines.balance.metaclip`): a pair matching entries E is kept with probability
``1 - prod_{e in E}(1 - p_e)``, ``p_e = min(1, t / count_e)``, decided by a uniform number that is a hash of
(seed, epoch, uid). The decision therefore depends on nothing but the seed, the epoch and the pair: any number of
workers or ranks, any shard order and a run resumed in the middle of an epoch all see the same subset.

The entry counts and ``t`` come from a build's ``manifest.json`` (``entry_counts.before`` = the pool's counts, and
``balance.t``), from an entry-counts Parquet (``entry_id``, ``count``; give ``t``), or from a pool Parquet file or
directory (``uid``, ``entry_ids`` and optionally ``status``: rows whose status is not ``ok`` are left out; give ``t``).
The training shards should hold the unbalanced pool (for a clipline build: ``--t`` at least the largest entry count
keeps every pair); each sample's ``.json`` must carry ``uid`` and ``entry_ids`` (clipline's shards do).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from clip_train.errors import TrainError
from pipelines.balance import metaclip
from pipelines.core import storage


@dataclass
class OnlineBalance:
    counts: Mapping[int, int]  # pool count per entry id
    t: float
    seed: int = 0
    source: str = ""
    _prob_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.t, (int, float)) and math.isfinite(self.t) and self.t > 0):
            raise TrainError(f"online balancing: t must be a positive number, got {self.t!r}")
        if not self.counts:
            raise TrainError(f"online balancing: {self.source or 'the pool'} has no entry counts")

    def keep_probability(self, entry_ids: Sequence[int]) -> float:
        try:
            key = tuple(sorted(int(e) for e in entry_ids))
        except (TypeError, ValueError):
            raise TrainError(f"online balancing: entry_ids must be integer entry ids, got {list(entry_ids)[:5]!r}") from None
        p = self._prob_cache.get(key)
        if p is None:
            # An entry the counts do not list matched no pooled pair; a count of 0 keeps it (p_e = 1), as the build.
            p = metaclip.keep_probability(key, _Counts(self.counts), self.t)
            if len(self._prob_cache) < 1_000_000:
                self._prob_cache[key] = p
        return p

    def epoch_seed(self, epoch: int) -> str:
        return f"{self.seed}:online-epoch:{int(epoch)}"

    def keep(self, epoch: int, uid: str, entry_ids: Sequence[int]) -> bool:
        return metaclip.uniform_draw(self.epoch_seed(epoch), str(uid)) < self.keep_probability(entry_ids)  # type: ignore[arg-type]

    def expected_kept(self, entry_lists: Iterable[Sequence[int]]) -> float:
        return math.fsum(self.keep_probability(ids) for ids in entry_lists)

    def describe(self) -> dict:
        return {"source": self.source, "t": self.t, "seed": self.seed, "entries": len(self.counts)}


class _Counts(Mapping):
    def __init__(self, counts: Mapping[int, int]):
        self._c = counts

    def __getitem__(self, k):
        return self._c.get(int(k), 0)

    def __iter__(self):
        return iter(self._c)

    def __len__(self) -> int:
        return len(self._c)


def _counts_from_pool_rows(rows: Iterable[dict]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        for e in r.get("entry_ids") or []:
            counts[int(e)] = counts.get(int(e), 0) + 1
    return counts


def load_online_balance(source: str, t: float | None = None, seed: int = 0) -> OnlineBalance:
    """Counts and t from a manifest.json (or a build directory holding one), an entry-counts Parquet, or a pool
    Parquet file / directory. ``t`` overrides the manifest's."""
    source = str(source)
    manifest_uri = None
    if source.endswith(".json"):
        manifest_uri = source
    elif storage.exists(storage.join(source, "manifest.json")):
        manifest_uri = storage.join(source, "manifest.json")
    if manifest_uri is not None:
        try:
            manifest = storage.read_json(manifest_uri)
        except ValueError as exc:
            raise TrainError(f"{manifest_uri}: not a JSON manifest ({exc})") from None
        try:
            counts = {int(k): int(v) for k, v in manifest["entry_counts"]["before"].items()}
        except (KeyError, TypeError, AttributeError):
            raise TrainError(f"{manifest_uri}: expected entry_counts.before (the pool's per-entry counts) as written "
                             f"by clipline build") from None
        if t is None:
            t = (manifest.get("balance") or {}).get("t")
        if t is None:
            raise TrainError(f"{manifest_uri}: no balance.t in the manifest; pass --online-t")
        return OnlineBalance(counts, float(t), seed, manifest_uri)
    # Parquet: entry counts or pool rows.
    files = [source] if not _is_dir(source) else [u for u in storage.list_prefix(source) if u.endswith(".parquet")]
    if not files:
        raise TrainError(f"{source}: no manifest.json and no Parquet files (expected a build's manifest.json, an "
                         f"entry-counts Parquet or a pool of Parquet files with uid and entry_ids)")
    counts: dict[int, int] = {}
    for uri in files:
        table = storage.read_table(uri)
        cols = set(table.column_names)
        if {"entry_id", "count"} <= cols:
            for r in table.select(["entry_id", "count"]).to_pylist():
                counts[int(r["entry_id"])] = counts.get(int(r["entry_id"]), 0) + int(r["count"])
        elif "entry_ids" in cols:
            part = _counts_from_pool_rows(table.select([c for c in ("entry_ids", "status") if c in cols]).to_pylist())
            for e, c in part.items():
                counts[e] = counts.get(e, 0) + c
        else:
            raise TrainError(f"{uri}: expected columns entry_id + count (entry counts) or entry_ids (a pool), "
                             f"found {sorted(cols)}")
    if t is None:
        raise TrainError(f"{source}: a pool or entry-counts file carries no t; pass --online-t")
    return OnlineBalance(counts, float(t), seed, source)


def _is_dir(uri: str) -> bool:
    if storage.is_s3(uri):
        return not uri.endswith(".parquet")
    import os

    return os.path.isdir(uri)
