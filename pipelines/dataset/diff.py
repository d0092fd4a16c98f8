"""What changed between two published versions of a dataset root: samples added and removed, each with why, and
the entries whose sample counts moved most.

    d = diff_versions(DatasetRoot.open("ROOT"), 2, 3)
    d["removed_by_reason"]   # {"takedown": 12, "rebalanced out": 3}
    d["movers"]              # [{"entry_id", "entry", "before", "after", "delta"}, ...] largest |delta| first

A sample is a uid in a version's shard Parquet files. Why a sample of A is not in B comes from B's rejected rows
(every input row of B that did not reach a shard has one, with its stage and reason):

================================  =========================================================
B's rejected row                  removed because
================================  =========================================================
crawl:takedown                    ``takedown``
crawl:<any other reason>          ``now failing`` (the URL's download fails now)
balance:not_sampled               ``rebalanced out`` (the entry counts changed)
decontam:eval_overlap:<set>       ``newly contaminated``
images/dedup:<reason>             ``image check: <reason>``
curate:<reason>                   ``curation: <reason>`` (e.g. a duplicate URL in a new file)
(none)                            ``input removed`` (the pair is not among B's inputs)
================================  =========================================================

Why a sample of B is new comes from A's rejected rows the same way: none -> ``new input``; crawl failure ->
``now fetched``; ``balance:not_sampled`` -> ``rebalanced in``; decontamination -> ``no longer contaminated``;
anything else -> ``was <stage>:<reason>``.
"""
from __future__ import annotations

from collections import Counter

import pyarrow as pa

from pipelines.core import storage
from pipelines.dataset.versions import DatasetRoot


def _samples(root: DatasetRoot, n: int) -> dict[str, dict]:
    dest = root.version_dir(n)
    out: dict[str, dict] = {}
    for s in root.manifest(n)["shards"]:
        t = storage.read_table(storage.join(dest, "shards", s["name"][:-4] + ".parquet"),
                               columns=["uid", "url", "caption", "entry_ids"])
        for row in t.to_pylist():
            out[row["uid"]] = row
    return out


def _rejected(root: DatasetRoot, n: int) -> dict[str, tuple[str, str]]:
    dest = storage.join(root.version_dir(n), "rejected")
    out: dict[str, tuple[str, str]] = {}
    try:
        files = [u for u in storage.list_prefix(dest) if u.endswith(".parquet")]
    except storage.StorageError:
        return out
    for uri in sorted(files):
        t = storage.read_table(uri, columns=["uid", "stage", "reason"])
        for uid, stage, reason in zip(t.column("uid").to_pylist(), t.column("stage").to_pylist(),
                                      t.column("reason").to_pylist()):
            if uid is not None:
                out[uid] = (stage or "", reason or "")
    return out


def removed_reason(rej: tuple[str, str] | None) -> str:
    if rej is None:
        return "input removed"
    stage, reason = rej
    if reason == "takedown":
        return "takedown"
    if stage == "crawl":
        return "now failing"
    if stage == "balance":
        return "rebalanced out"
    if stage == "decontam":
        return "newly contaminated"
    if stage in ("images", "dedup"):
        return f"image check: {reason}"
    return f"curation: {reason}" if stage == "curate" else f"{stage}: {reason}"


def added_reason(rej: tuple[str, str] | None) -> str:
    if rej is None:
        return "new input"
    stage, reason = rej
    if stage == "crawl" and reason != "takedown":
        return "now fetched"
    if stage == "balance":
        return "rebalanced in"
    if stage == "decontam":
        return "no longer contaminated"
    return f"was {stage}:{reason}"


def diff_versions(root: DatasetRoot, a: int, b: int, *, top: int = 10, sample_rows: int = 20) -> dict:
    """Samples added / removed between published versions ``a`` and ``b`` with reasons, and the largest movers."""
    sa, sb = _samples(root, a), _samples(root, b)
    ra, rb = _rejected(root, a), _rejected(root, b)
    added = sorted(set(sb) - set(sa))
    removed = sorted(set(sa) - set(sb))
    add_why = {u: added_reason(ra.get(u)) for u in added}
    rem_why = {u: removed_reason(rb.get(u)) for u in removed}
    ma, mb = root.manifest(a), root.manifest(b)
    ca = {int(k): int(v) for k, v in ma["entry_counts"]["after"].items()}
    cb = {int(k): int(v) for k, v in mb["entry_counts"]["after"].items()}
    entries = _entry_names(mb)
    movers = []
    for e in set(ca) | set(cb):
        d = cb.get(e, 0) - ca.get(e, 0)
        if d:
            movers.append({"entry_id": e, "entry": entries[e] if entries and e < len(entries) else None,
                           "before": ca.get(e, 0), "after": cb.get(e, 0), "delta": d})
    movers.sort(key=lambda m: (-abs(m["delta"]), m["entry_id"]))
    return {
        "a": a, "b": b, "samples": {"a": len(sa), "b": len(sb)},
        "added": len(added), "removed": len(removed),
        "added_by_reason": dict(Counter(add_why.values()).most_common()),
        "removed_by_reason": dict(Counter(rem_why.values()).most_common()),
        "movers": movers[:top], "entries_changed": len(movers),
        "added_samples": [{**_brief(sb[u]), "why": add_why[u]} for u in added[:sample_rows]],
        "removed_samples": [{**_brief(sa[u]), "why": rem_why[u]} for u in removed[:sample_rows]],
        "added_uids": added, "removed_uids": removed, "why": {**add_why, **rem_why},
    }


def _brief(row: dict) -> dict:
    return {"uid": row["uid"], "url": row["url"], "caption": (row["caption"] or "")[:80]}


def _entry_names(manifest: dict) -> list[str] | None:
    from pipelines.curate import querylist as QL

    try:
        return list(QL.load(manifest["lineage"]["querylist"]["uri"]).entries)
    except Exception:  # noqa: BLE001 - the diff still names entry ids
        return None


def diff_table(d: dict) -> pa.Table:
    """Every added / removed uid with its reason, as a table (for --out FILE.parquet)."""
    uids = d["added_uids"] + d["removed_uids"]
    return pa.table({"uid": pa.array(uids, pa.string()),
                     "change": pa.array(["added"] * len(d["added_uids"]) + ["removed"] * len(d["removed_uids"])),
                     "why": pa.array([d["why"][u] for u in uids], pa.string())})
