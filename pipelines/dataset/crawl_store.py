"""The crawl store: one record per URL, shared by every version of a dataset root, so a URL is downloaded once.

    store = CrawlStore.open("ROOT/crawl_store")                 # local path or s3:// prefix; created when absent
    plan = store.plan(urls, as_of="2025-03-01T00:00:00Z", layout=layout_fingerprint(crawl_config))
    plan.fetch        # URLs to download now: never seen, stored with other image settings, or a failure now due
    plan.ok           # url -> stored success (bytes, sha256, pHash, dHash, sizes): never downloaded again
    plan.failed       # url -> stored failure whose back-off has not expired at ``as_of``: reused as it is
    store.record(results, as_of)                                # after the crawl: successes (with bytes), failures
    store.delete(urls)                                          # takedown: the stored bytes are gone for good

Keyed by URL hash (sha256 of the URL, hex): the caption is not part of what is downloaded, so every (url, caption)
pair with the same URL shares one record. The clock is always the build's ``as_of`` (never the wall clock), so a
test or a rebuild decides "due for retry" exactly as the original build did.

Back-off (:class:`BackoffPolicy`): a failure is tried again only ``wait(reason, failures)`` after its last attempt:
``transient_days`` (default 1) for reasons in :data:`pipelines.core.reasons.RETRYABLE_CRAWL_REASONS` (timeouts,
5xx, 429, connection errors...), ``permanent_days`` (default 30) for everything else (404, opt-out, robots, not an
image, decode errors...), per-reason overrides in ``by_reason``; each further consecutive failure multiplies the
wait by ``factor`` up to ``max_days``. A success is never fetched again unless the image settings that shape the
stored bytes change (``layout``: image size, resize mode, encoding -- see :func:`layout_fingerprint`).

Layout (all writes whole: temp + rename locally, one PUT on S3)::

    STORE/STORE.json                  format marker
    STORE/packs/NNNNNNNN.tar          image bytes: a plain tar, members ``<url_hash>.<ext>`` (offset + size indexed)
    STORE/index/seg-NNNNNNNN.parquet  index segments, append-only: the row of a URL in the newest segment wins

A write is a new pack (if it has bytes) and then a new index segment; a process killed between the two leaves an
unreferenced pack that :meth:`CrawlStore.gc` removes. Deleting bytes (takedowns) rewrites the affected packs
without those members, writes a segment that points the surviving entries at the new packs, and only then
deletes the old packs, so a reader never sees a dangling offset and no taken-down byte survives a finished call.
One writer per store at a time (the version flow holds it); readers may run alongside.

Scale: lookups read the whole index (a few dozen bytes per URL, Parquet): fine for tens of millions of URLs on one
machine; :meth:`CrawlStore.compact` folds the segments into one. Beyond that the index would be partitioned by URL
hash prefix (the key already allows it).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipelines.core import reasons as R
from pipelines.core import storage
from pipelines.core.config import Config, check
from pipelines.core.errors import ClipError

FORMAT = "clipline-crawl-store"
FORMAT_VERSION = 1
DAY = 86_400

OK, FAILED, DELETED = "ok", "failed", "deleted"
# What plan()/lookup() say about a URL
HIT, REUSE_FAILED, DUE, NEW = "hit", "failed", "due", "new"

# Settings of the crawl that shape the stored bytes and hashes of a success.
LAYOUT_FIELDS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
                 "min_image_size", "max_image_pixels")

INDEX_SCHEMA = pa.schema([
    pa.field("url_hash", pa.string(), nullable=False),
    pa.field("url", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok | failed | deleted
    pa.field("reason", pa.string()),  # failure reason (pipelines.core.reasons), "takedown" for deleted
    pa.field("error_message", pa.string()),
    pa.field("attempts", pa.int32(), nullable=False),  # downloads of this URL recorded so far
    pa.field("failures", pa.int32(), nullable=False),  # consecutive failures (0 after a success)
    pa.field("fetched_at", pa.int64(), nullable=False),  # as_of of the build that made the last attempt (epoch s)
    pa.field("next_retry", pa.int64()),  # failures: not fetched again before this time (epoch s)
    pa.field("layout", pa.string()),  # layout_fingerprint of the crawl settings the bytes were made with
    pa.field("pack", pa.string()),  # successes: the pack (relative to the store) and where the bytes are
    pa.field("offset", pa.int64()),
    pa.field("size", pa.int64()),
    pa.field("ext", pa.string()),
    pa.field("img_sha256", pa.string()),
    pa.field("img_width", pa.int32()),
    pa.field("img_height", pa.int32()),
    pa.field("img_error", pa.string()),
    pa.field("phash", pa.uint64()),
    pa.field("dhash", pa.uint64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
])
META_COLUMNS = ("img_sha256", "img_width", "img_height", "img_error", "phash", "dhash", "width", "height",
                "original_width", "original_height")

_SEG = re.compile(r"seg-(\d{8})\.parquet")
_PACK = re.compile(r"(\d{8})\.tar")


class StoreError(ClipError):
    """A crawl store that cannot be used as asked (not a store, bad as_of, unknown URL...)."""


# ------------------------------------------------------------------------------------------------------ helpers


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def parse_time(value: str | int | float | datetime | None, what: str = "as_of") -> int:
    """An instant as epoch seconds (UTC). Accepts ISO 8601 (``2025-03-01``, ``2025-03-01T12:00:00Z``; no zone =
    UTC), epoch seconds, or a datetime. ``None`` -> now (only the CLI and schedules default to the wall clock)."""
    if value is None:
        return int(time.time())
    if isinstance(value, bool):
        raise StoreError(f"{what}: expected a time, got {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        if re.fullmatch(r"\d{9,11}", text):
            return int(text)
        try:
            dt = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            raise StoreError(f"{what}: {value!r} is not a time (expected ISO 8601 such as 2025-03-01T00:00:00Z "
                             f"or epoch seconds)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


def format_time(epoch: int) -> str:
    """Canonical form of an instant: ``2025-03-01T00:00:00Z``."""
    return datetime.fromtimestamp(int(epoch), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def layout_fingerprint(crawl_config: Any) -> str:
    """Hash of the crawl settings that shape a stored success's bytes (a change means: download again)."""
    values = {f: getattr(crawl_config, f, None) for f in LAYOUT_FIELDS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BackoffPolicy(Config):
    """How long a failed URL waits before it is fetched again, by reason (days; see the module docstring)."""

    transient_days: float = 1.0
    permanent_days: float = 30.0
    by_reason: dict = field(default_factory=dict)  # reason -> days, e.g. {"http_429": 0.25, "opt_out": 90}
    factor: float = 2.0  # each further consecutive failure multiplies the wait
    max_days: float = 180.0

    def __post_init__(self):
        for name in ("transient_days", "permanent_days", "max_days"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, f"backoff.{name}",
                  f"expected a number of days >= 0, got {v!r}")
        check(isinstance(self.factor, (int, float)) and self.factor >= 1, "backoff.factor",
              f"expected a number >= 1, got {self.factor!r}")
        check(isinstance(self.by_reason, Mapping) and all(isinstance(v, (int, float)) and v >= 0
                                                          for v in self.by_reason.values()),
              "backoff.by_reason", f"expected reason -> days >= 0, got {self.by_reason!r}")

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def base_days(self, reason: str | None) -> float:
        reason = reason or ""
        if reason in self.by_reason:
            return float(self.by_reason[reason])
        if reason in R.RETRYABLE_CRAWL_REASONS or reason == R.MISSING_FROM_OUTPUT:
            return float(self.transient_days)
        return float(self.permanent_days)

    def wait_seconds(self, reason: str | None, failures: int = 1) -> int:
        """Seconds between the ``failures``-th consecutive failure with ``reason`` and the next attempt."""
        days = self.base_days(reason) * self.factor ** max(0, int(failures) - 1)
        return int(round(min(days, max(self.max_days, self.base_days(reason))) * DAY))


@dataclass
class FetchResult:
    """One download to record: ``status`` "ok" with the image ``data`` and its measurements (``meta``: keys of
    :data:`META_COLUMNS`), or "failed" with a ``reason``."""

    url: str
    status: str
    reason: str | None = None
    error_message: str | None = None
    data: bytes | None = None
    ext: str = "jpg"
    meta: dict = field(default_factory=dict)


@dataclass
class StorePlan:
    """What to do with each URL at ``as_of`` (see :meth:`CrawlStore.plan`)."""

    as_of: int
    ok: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, dict] = field(default_factory=dict)
    fetch: list[str] = field(default_factory=list)
    due: list[str] = field(default_factory=list)  # the part of ``fetch`` that are stored failures now due

    def counts(self) -> dict:
        return {"reused_ok": len(self.ok), "reused_failed": len(self.failed), "fetch": len(self.fetch),
                "due_retry": len(self.due), "new": len(self.fetch) - len(self.due)}


# -------------------------------------------------------------------------------------------------------- store


class CrawlStore:
    """See the module docstring. ``policy``: the back-off; ``uri``: a local directory or an s3:// prefix."""

    def __init__(self, uri: str, policy: BackoffPolicy | None = None):
        self.uri = str(uri).rstrip("/") if storage.is_s3(str(uri)) else str(uri)
        self.policy = policy or BackoffPolicy()
        self._index: dict[str, dict] | None = None

    # -- opening
    @classmethod
    def open(cls, uri: str, policy: BackoffPolicy | None = None, *, create: bool = True) -> "CrawlStore":
        store = cls(uri, policy)
        marker = storage.join(store.uri, "STORE.json")
        if storage.exists(marker):
            try:
                doc = storage.read_json(marker)
            except ValueError:
                doc = {}
            if doc.get("format") != FORMAT:
                raise StoreError(f"{marker}: not a clipline crawl store marker")
            if int(doc.get("version", 0)) > FORMAT_VERSION:
                raise StoreError(f"{marker}: store format v{doc.get('version')} is newer than this clipline "
                                 f"(v{FORMAT_VERSION})")
        elif create:
            storage.write_json(marker, {"format": FORMAT, "version": FORMAT_VERSION})
        else:
            raise StoreError(f"{store.uri}: no crawl store here (STORE.json missing)")
        return store

    # -- paths
    def _path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def _list(self, sub: str) -> list[str]:
        try:
            return storage.list_prefix(self._path(sub))
        except storage.StorageError:
            return []

    def _segments(self) -> list[tuple[int, str]]:
        out = []
        for uri in self._list("index"):
            m = _SEG.fullmatch(storage.basename(uri))
            if m:
                out.append((int(m.group(1)), uri))
        return sorted(out)

    def _packs(self) -> list[tuple[int, str]]:
        out = []
        for uri in self._list("packs"):
            m = _PACK.fullmatch(storage.basename(uri))
            if m:
                out.append((int(m.group(1)), uri))
        return sorted(out)

    def _next_seq(self) -> int:
        seqs = [s for s, _ in self._segments()] + [s for s, _ in self._packs()]
        return max(seqs, default=0) + 1

    # -- reading
    def index(self) -> dict[str, dict]:
        """url_hash -> the URL's current record (newest segment wins)."""
        if self._index is None:
            index: dict[str, dict] = {}
            for _seq, uri in self._segments():
                for row in storage.read_table(uri).to_pylist():
                    index[row["url_hash"]] = row
            self._index = index
        return self._index

    def get(self, url: str) -> dict | None:
        return self.index().get(url_hash(url))

    def state(self, entry: dict | None, as_of: int, layout: str | None = None) -> str:
        """HIT, REUSE_FAILED, DUE or NEW for one record at ``as_of``."""
        if entry is None or entry["status"] == DELETED:
            return NEW
        if entry["status"] == OK:
            return HIT if layout is None or entry.get("layout") == layout else NEW
        return DUE if entry.get("next_retry") is None or entry["next_retry"] <= as_of else REUSE_FAILED

    def plan(self, urls: Iterable[str], as_of: str | int, layout: str | None = None) -> StorePlan:
        """Split ``urls`` (duplicates allowed) into stored successes, stored failures not yet due, and URLs to
        fetch (new, other layout, deleted, or failures whose back-off has expired at ``as_of``)."""
        t = parse_time(as_of)
        plan = StorePlan(as_of=t)
        index = self.index()
        seen: set[str] = set()
        for url in urls:
            if url in seen:
                continue
            seen.add(url)
            entry = index.get(url_hash(url))
            st = self.state(entry, t, layout)
            if st == HIT:
                plan.ok[url] = entry
            elif st == REUSE_FAILED:
                plan.failed[url] = entry
            else:
                plan.fetch.append(url)
                if st == DUE:
                    plan.due.append(url)
        plan.fetch.sort()
        plan.due.sort()
        return plan

    def due(self, as_of: str | int, urls: Iterable[str] | None = None) -> list[str]:
        """Stored failures whose back-off has expired at ``as_of`` (among ``urls`` when given), sorted."""
        t = parse_time(as_of)
        if urls is None:
            entries = self.index().values()
        else:
            index = self.index()
            entries = [e for e in (index.get(url_hash(u)) for u in set(urls)) if e is not None]
        return sorted(e["url"] for e in entries if e["status"] == FAILED and self.state(e, t) == DUE)

    def read_image(self, entry: dict) -> bytes:
        """The stored bytes of a success (one ranged read of its pack)."""
        if entry.get("status") != OK or not entry.get("pack"):
            raise StoreError(f"{entry.get('url')}: no stored image ({entry.get('status')})")
        with storage.open_read(self._path(entry["pack"])) as f:
            f.seek(int(entry["offset"]))
            data = f.read(int(entry["size"]))
        if entry.get("img_sha256") and hashlib.sha256(data).hexdigest() != entry["img_sha256"]:
            raise StoreError(f"{self._path(entry['pack'])}: bytes of {entry['url']} do not match their sha256")
        return data

    def stats(self) -> dict:
        by_status: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        for e in self.index().values():
            by_status[e["status"]] = by_status.get(e["status"], 0) + 1
            if e["status"] == FAILED:
                by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
        return {"urls": len(self.index()), "by_status": dict(sorted(by_status.items())),
                "failed_by_reason": dict(sorted(by_reason.items())), "segments": len(self._segments()),
                "packs": len(self._packs()), "pack_bytes": sum(storage.size_of(u) for _s, u in self._packs())}

    # -- writing
    def record(self, results: Iterable[FetchResult], as_of: str | int, layout: str | None = None) -> int:
        """Record downloads made at ``as_of``: one pack with the new bytes, then one index segment. Returns the
        number of records written. A failure's next retry is ``as_of + policy.wait(reason, failures)``."""
        t = parse_time(as_of)
        results = list(results)
        if not results:
            return 0
        index = self.index()
        seq = self._next_seq()
        pack_rel = f"packs/{seq:08d}.tar"
        latest: dict[str, FetchResult] = {}
        for r in results:  # one record per URL: a success wins over a failure of the same URL in the same call
            prev = latest.get(r.url)
            if prev is None or (prev.status != OK and r.status == OK):
                latest[r.url] = r
        rows: list[dict] = []
        members: list[tuple[str, bytes]] = []
        for url in sorted(latest):
            r = latest[url]
            h = url_hash(url)
            old = index.get(h)
            attempts = int(old["attempts"]) + 1 if old else 1
            row = {c.name: None for c in INDEX_SCHEMA}
            row.update(url_hash=h, url=url, attempts=attempts, fetched_at=t, layout=layout,
                       error_message=r.error_message)
            if r.status == OK:
                if r.data is None:
                    raise StoreError(f"{url}: a success needs its image bytes")
                row.update(status=OK, failures=0, ext=r.ext or "jpg",
                           **{k: r.meta.get(k) for k in META_COLUMNS})
                if row["img_sha256"] is None:
                    row["img_sha256"] = hashlib.sha256(r.data).hexdigest()
                members.append((f"{h}.{row['ext']}", r.data))
                row["pack"] = pack_rel
            else:
                failures = (int(old["failures"]) if old and old["status"] == FAILED else 0) + 1
                reason = r.reason or "other:unknown"
                row.update(status=FAILED, reason=reason, failures=failures,
                           next_retry=t + self.policy.wait_seconds(reason, failures))
            rows.append(row)
        if members:
            offsets = self._write_pack(self._path(pack_rel), members)
            for row in rows:
                if row["status"] == OK:
                    row["offset"], row["size"] = offsets[f"{row['url_hash']}.{row['ext']}"]
        self._write_segment(seq, rows)
        return len(rows)

    def delete(self, urls: Iterable[str], *, reason: str = R.TAKEDOWN) -> list[str]:
        """Delete the stored bytes of ``urls`` (takedowns): their packs are rewritten without them and the records
        become ``deleted`` (a later plan treats them as never fetched; keeping a taken-down URL out of a dataset
        is the takedown list's job). Returns the URLs whose bytes were deleted. Idempotent."""
        index = self.index()
        targets = {}
        for url in set(urls):
            e = index.get(url_hash(url))
            if e is not None and e["status"] == OK:
                targets[e["url_hash"]] = e
        self.gc()
        if not targets:
            return []
        affected = sorted({e["pack"] for e in targets.values()})
        seq = self._next_seq()
        rows: list[dict] = []
        old_packs = []
        for pack_rel in affected:
            keep = [e for e in index.values() if e["status"] == OK and e["pack"] == pack_rel
                    and e["url_hash"] not in targets]
            new_rel = f"packs/{seq:08d}.tar"
            seq += 1
            if keep:
                members = [(f"{e['url_hash']}.{e['ext']}", self.read_image(e)) for e in keep]
                offsets = self._write_pack(self._path(new_rel), members)
                for e in keep:
                    off, size = offsets[f"{e['url_hash']}.{e['ext']}"]
                    rows.append({**e, "pack": new_rel, "offset": off, "size": size})
            old_packs.append(self._path(pack_rel))
        for e in targets.values():
            rows.append({**e, "status": DELETED, "reason": reason, "pack": None, "offset": None, "size": None})
        self._write_segment(seq, rows)
        for uri in old_packs:
            storage.delete(uri)
        return sorted(e["url"] for e in targets.values())

    def gc(self) -> list[str]:
        """Delete packs no current record points at (left by a killed write or an earlier delete)."""
        used = {e["pack"] for e in self.index().values() if e.get("pack")}
        gone = []
        for _seq, uri in self._packs():
            rel = f"packs/{storage.basename(uri)}"
            if rel not in used:
                storage.delete(uri)
                gone.append(uri)
        return gone

    def compact(self) -> None:
        """Fold every index segment into one (same records; fewer files to read)."""
        segs = self._segments()
        if len(segs) <= 1:
            return
        rows = sorted(self.index().values(), key=lambda r: r["url_hash"])
        seq = self._next_seq()
        self._write_segment(seq, rows)
        for _s, uri in segs:
            storage.delete(uri)
        self._index = None

    # -- internals
    def _write_pack(self, uri: str, members: list[tuple[str, bytes]]) -> dict[str, tuple[int, int]]:
        buf = io.BytesIO()
        offsets: dict[str, tuple[int, int]] = {}
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
                offsets[name] = (tar.offset - _padded(len(data)), len(data))
        storage.write_bytes_atomic(uri, buf.getvalue())
        return offsets

    def _write_segment(self, seq: int, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        storage.write_table(self._path("index", f"seg-{seq:08d}.parquet"), table)
        self._index = None


def _padded(n: int) -> int:
    return int(math.ceil(n / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
