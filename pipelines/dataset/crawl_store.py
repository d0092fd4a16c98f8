"""The crawl store: one record per URL, shared by every version of a dataset root, so a URL is downloaded once.

    store = CrawlStore.open("ROOT/crawl_store")                 # local path or s3:// prefix; created when absent
    plan = store.plan(urls, as_of="2025-03-01T00:00:00Z", layout=layout_fingerprint(crawl_config))
    plan.fetch_urls   # URLs to download now: never seen, stored with other image settings, or a failure now due
    plan.state        # per distinct URL (plan.urls): HIT (stored success: never downloaded again), REUSE_FAILED
                      # (stored failure whose back-off has not expired at ``as_of``), DUE or NEW (to fetch)
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

Scale: the index is read once into one Arrow table (:meth:`CrawlStore.index_table`: ~200 bytes per URL, no Python
object per URL) and kept current by the store's own writes; plans and lookups are Arrow joins
(:meth:`CrawlStore.lookup`, :meth:`CrawlStore.plan`), so tens of millions of URLs fit one machine;
:meth:`CrawlStore.compact` folds the segments into one. Beyond that the index would be partitioned by URL hash
prefix (the key already allows it).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import reasons as R
from pipelines.core import storage
from pipelines.core.config import Config, check
from pipelines.core.errors import ClipError
from pipelines.core.table_ops import as_array, one_per_key
from pipelines.core.ustar import UstarWriter

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


def hash_urls(urls: pa.Array | pa.ChunkedArray) -> pa.Array:
    """:func:`url_hash` of each URL (each distinct URL hashed once)."""
    enc = as_array(urls).cast(pa.string()).dictionary_encode()
    hashes = pa.array([url_hash(u) for u in enc.dictionary.to_pylist()], pa.string())
    return hashes.take(enc.indices)


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
    """What to do with each distinct URL at ``as_of`` (see :meth:`CrawlStore.plan`): ``urls``, their stored
    records (``entries``, null rows for URLs never stored) and their ``state`` (HIT, REUSE_FAILED, DUE, NEW), as
    Arrow columns row for row. The dict/list views are for small plans and tests."""

    as_of: int
    urls: pa.Array
    entries: pa.Table
    state: pa.Array

    def _where(self, *states: str) -> pa.Array:
        return pc.is_in(self.state, value_set=pa.array(states, pa.string()))

    @property
    def fetch_urls(self) -> pa.Array:
        """The URLs to download now (new, other layout, deleted, or failures now due), sorted."""
        urls = self.urls.filter(self._where(NEW, DUE))
        return urls.take(pc.array_sort_indices(urls))

    @property
    def fetch(self) -> list[str]:
        return self.fetch_urls.to_pylist()

    @property
    def due(self) -> list[str]:  # the part of ``fetch`` that are stored failures now due
        return sorted(self.urls.filter(self._where(DUE)).to_pylist())

    def _entries(self, state: str) -> dict[str, dict]:
        mask = self._where(state)
        return dict(zip(self.urls.filter(mask).to_pylist(), self.entries.filter(mask).to_pylist()))

    @property
    def ok(self) -> dict[str, dict]:
        return self._entries(HIT)

    @property
    def failed(self) -> dict[str, dict]:
        return self._entries(REUSE_FAILED)

    def counts(self) -> dict:
        n = {k: 0 for k in (HIT, REUSE_FAILED, DUE, NEW)}
        for item in pc.value_counts(self.state).to_pylist():
            n[item["values"]] = item["counts"]
        return {"reused_ok": n[HIT], "reused_failed": n[REUSE_FAILED], "fetch": n[DUE] + n[NEW],
                "due_retry": n[DUE], "new": n[NEW]}


# -------------------------------------------------------------------------------------------------------- store


class CrawlStore:
    """See the module docstring. ``policy``: the back-off; ``uri``: a local directory or an s3:// prefix."""

    def __init__(self, uri: str, policy: BackoffPolicy | None = None):
        self.uri = str(uri).rstrip("/") if storage.is_s3(str(uri)) else str(uri)
        self.policy = policy or BackoffPolicy()
        self._table: pa.Table | None = None  # index_table(), once read

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
    def index_table(self) -> pa.Table:
        """Every URL's current record as one Arrow table (the row of the newest segment wins), cached; kept current
        by this object's own writes."""
        if self._table is None:
            parts = []
            for seq, uri in self._segments():
                t = storage.read_table(uri)
                parts.append(t.append_column("__seq", pa.array(np.full(t.num_rows, seq, np.int64))))
            if not parts:
                self._table = INDEX_SCHEMA.empty_table()
            else:
                t = pa.concat_tables(parts, promote_options="permissive")
                t = t.sort_by([("url_hash", "ascending"), ("__seq", "ascending")])
                self._table = one_per_key(t, "url_hash", last=True).select(INDEX_SCHEMA.names)
        return self._table

    def lookup(self, hashes: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The current record of each URL hash, row for row (a row of nulls where the store has none)."""
        t = self.index_table()
        pos = pc.index_in(as_array(hashes).cast(pa.string()), value_set=as_array(t.column("url_hash")))
        return t.take(pos)

    def index(self) -> dict[str, dict]:
        """url_hash -> the URL's current record, as Python dicts (for small stores and tests; the builds use
        :meth:`index_table` / :meth:`lookup`)."""
        return {row["url_hash"]: row for row in self.index_table().to_pylist()}

    def get(self, url: str) -> dict | None:
        rows = self.lookup(pa.array([url_hash(url)])).to_pylist()
        return rows[0] if rows[0]["url_hash"] is not None else None

    def states(self, entries: pa.Table, as_of: int, layout: str | None = None) -> pa.Array:
        """HIT, REUSE_FAILED, DUE or NEW for each record of ``entries`` (rows of :data:`INDEX_SCHEMA`, null rows
        for URLs never stored) at ``as_of``: a success is a hit unless it was made with another ``layout``; a
        failure is due once its ``next_retry`` has come; a deleted or unknown URL is new."""
        n = entries.num_rows
        status = pc.fill_null(as_array(entries.column("status")), DELETED)
        ok, failed = pc.equal(status, OK), pc.equal(status, FAILED)
        if layout is not None:
            ok = pc.and_(ok, pc.fill_null(pc.equal(as_array(entries.column("layout")), layout), False))
        nxt = as_array(entries.column("next_retry"))
        due = pc.and_(failed, pc.fill_null(pc.less_equal(nxt, pa.scalar(int(as_of), pa.int64())), True))
        reuse = pc.and_(failed, pc.invert(due))
        out = pc.if_else(ok, HIT, pc.if_else(reuse, REUSE_FAILED, pc.if_else(due, DUE, NEW)))
        return out if n else pa.array([], pa.string())

    def state(self, entry: dict | None, as_of: int, layout: str | None = None) -> str:
        """HIT, REUSE_FAILED, DUE or NEW for one record at ``as_of`` (the rule of :meth:`states`)."""
        row = {c.name: None for c in INDEX_SCHEMA} | (entry or {})
        return self.states(pa.Table.from_pylist([row], schema=INDEX_SCHEMA), as_of, layout)[0].as_py()

    def plan(self, urls: Iterable[str] | pa.Array | pa.ChunkedArray, as_of: str | int,
             layout: str | None = None) -> StorePlan:
        """Split ``urls`` (duplicates allowed) into stored successes, stored failures not yet due, and URLs to
        fetch (new, other layout, deleted, or failures whose back-off has expired at ``as_of``); column-wise."""
        t = parse_time(as_of)
        urls = as_array(urls) if isinstance(urls, (pa.Array, pa.ChunkedArray)) else pa.array(list(urls), pa.string())
        distinct = pc.unique(urls.cast(pa.string()))
        entries = self.lookup(hash_urls(distinct))
        return StorePlan(as_of=t, urls=distinct, entries=entries, state=self.states(entries, t, layout))

    def due(self, as_of: str | int, urls: Iterable[str] | None = None) -> list[str]:
        """Stored failures whose back-off has expired at ``as_of`` (among ``urls`` when given), sorted."""
        t = parse_time(as_of)
        entries = self.index_table() if urls is None else \
            self.lookup(hash_urls(pc.unique(pa.array(list(urls), pa.string()))))
        mask = pc.and_(pc.equal(pc.fill_null(as_array(entries.column("status")), DELETED), FAILED),
                       pc.equal(self.states(entries, t), DUE))
        return sorted(as_array(entries.column("url")).filter(mask).to_pylist())

    def read_image(self, entry: dict) -> bytes:
        """The stored bytes of a success (one ranged read of its pack)."""
        with self.image_reader() as read:
            return read(entry)

    @contextmanager
    def image_reader(self, max_open: int = 16):
        """``read(entry) -> bytes`` for many successes, keeping up to ``max_open`` packs open (on S3 each read is
        still one ranged GET; locally it saves an open per image). Checks each image's sha256."""
        handles: OrderedDict[str, Any] = OrderedDict()

        def read(entry: dict) -> bytes:
            if entry.get("status") != OK or not entry.get("pack"):
                raise StoreError(f"{entry.get('url')}: no stored image ({entry.get('status')})")
            f = handles.get(entry["pack"])
            if f is None:
                if len(handles) >= max_open:
                    handles.popitem(last=False)[1].close()
                f = handles[entry["pack"]] = storage.open_read(self._path(entry["pack"]))
            else:
                handles.move_to_end(entry["pack"])
            f.seek(int(entry["offset"]))
            data = f.read(int(entry["size"]))
            if entry.get("img_sha256") and hashlib.sha256(data).hexdigest() != entry["img_sha256"]:
                raise StoreError(f"{self._path(entry['pack'])}: bytes of {entry['url']} do not match their sha256")
            return data

        try:
            yield read
        finally:
            for f in handles.values():
                f.close()

    # -- writing
    def record(self, results: Iterable[FetchResult], as_of: str | int, layout: str | None = None) -> int:
        """Record downloads made at ``as_of``: one pack with the new bytes, then one index segment. Returns the
        number of records written. A failure's next retry is ``as_of + policy.wait(reason, failures)``. A large
        fetch records in several calls (each a pack and a segment), so its bytes need not all be in memory."""
        t = parse_time(as_of)
        results = list(results)
        if not results:
            return 0
        seq = self._next_seq()
        pack_rel = f"packs/{seq:08d}.tar"
        latest: dict[str, FetchResult] = {}
        for r in results:  # one record per URL: a success wins over a failure of the same URL in the same call
            prev = latest.get(r.url)
            if prev is None or (prev.status != OK and r.status == OK):
                latest[r.url] = r
        urls = sorted(latest)
        hashes = [url_hash(u) for u in urls]
        olds = self.lookup(pa.array(hashes, pa.string())).to_pylist()
        rows: list[dict] = []
        members: list[tuple[str, bytes]] = []
        for url, h, old in zip(urls, hashes, olds):
            r = latest[url]
            old = old if old["url_hash"] is not None else None
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
        is the takedown list's job). Returns the URLs whose bytes were deleted. Idempotent. Column-wise: one
        pack's surviving records are Python objects at a time (a domain takedown can touch every pack)."""
        wanted = pc.unique(pa.array(list(urls), pa.string()))
        found = self.lookup(hash_urls(wanted))
        found = found.filter(pc.fill_null(pc.equal(as_array(found.column("status")), OK), False))
        self.gc()
        if not found.num_rows:
            return []
        index = self.index_table()
        targets = as_array(found.column("url_hash"))
        surviving = pc.and_(pc.equal(as_array(index.column("status")), OK),
                            pc.invert(pc.is_in(as_array(index.column("url_hash")), value_set=targets)))
        packs = as_array(index.column("pack"))
        seq = self._next_seq()
        pieces: list[pa.Table] = []
        old_packs = []
        for pack_rel in sorted(pc.unique(as_array(found.column("pack"))).to_pylist()):
            keep = index.filter(pc.and_(surviving, pc.fill_null(pc.equal(packs, pack_rel), False)))
            new_rel = f"packs/{seq:08d}.tar"
            seq += 1
            if keep.num_rows:
                with self.image_reader() as read:
                    members = [(f"{e['url_hash']}.{e['ext']}", read(e)) for e in keep.to_pylist()]
                offsets = self._write_pack(self._path(new_rel), members)
                where = [offsets[name] for name, _data in members]
                del members
                keep = _replace(keep, pack=pa.array([new_rel] * keep.num_rows, pa.string()),
                                offset=pa.array([o for o, _n in where], pa.int64()),
                                size=pa.array([n for _o, n in where], pa.int64()))
                pieces.append(keep)
            old_packs.append(self._path(pack_rel))
        n = found.num_rows
        pieces.append(_replace(found, status=pa.array([DELETED] * n, pa.string()),
                               reason=pa.array([reason] * n, pa.string()), pack=pa.nulls(n, pa.string()),
                               offset=pa.nulls(n, pa.int64()), size=pa.nulls(n, pa.int64())))
        self._write_segment(seq, pa.concat_tables(pieces))
        for uri in old_packs:
            storage.delete(uri)
        return sorted(found.column("url").to_pylist())

    def gc(self) -> list[str]:
        """Delete packs no current record points at (left by a killed write or an earlier delete)."""
        used = set(pc.unique(as_array(self.index_table().column("pack")).drop_null()).to_pylist())
        gone = []
        for _seq, uri in self._packs():
            rel = f"packs/{storage.basename(uri)}"
            if rel not in used:
                storage.delete(uri)
                gone.append(uri)
        return gone

    def stats(self) -> dict:
        t = self.index_table()
        status = as_array(t.column("status"))
        by_status = {d["values"]: d["counts"] for d in pc.value_counts(status).to_pylist()}
        failed = as_array(t.column("reason")).filter(pc.equal(status, FAILED))
        by_reason = {d["values"]: d["counts"] for d in pc.value_counts(failed).to_pylist()}
        return {"urls": t.num_rows, "by_status": dict(sorted(by_status.items())),
                "failed_by_reason": dict(sorted(by_reason.items())), "segments": len(self._segments()),
                "packs": len(self._packs()), "pack_bytes": sum(storage.size_of(u) for _s, u in self._packs())}

    def compact(self) -> None:
        """Fold every index segment into one (same records; fewer files to read)."""
        segs = self._segments()
        if len(segs) <= 1:
            return
        table = self.index_table().sort_by("url_hash")
        seq = self._next_seq()
        storage.write_table(self._path("index", f"seg-{seq:08d}.parquet"), table)
        for _s, uri in segs:
            storage.delete(uri)
        self._table = None

    # -- internals
    def _write_pack(self, uri: str, members: list[tuple[str, bytes]]) -> dict[str, tuple[int, int]]:
        buf = io.BytesIO()
        with UstarWriter(buf) as tar:
            offsets = {name: (tar.add(name, data, mode=0o644), len(data)) for name, data in members}
        storage.write_bytes_atomic(uri, buf.getvalue())
        return offsets

    def _write_segment(self, seq: int, rows: list[dict] | pa.Table) -> None:
        table = rows.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA) if isinstance(rows, pa.Table) else \
            pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        storage.write_table(self._path("index", f"seg-{seq:08d}.parquet"), table)
        if self._table is not None:  # the new rows replace their URLs' records in the cached index
            old = self._table.filter(pc.invert(pc.is_in(self._table.column("url_hash"),
                                                        value_set=table.column("url_hash"))))
            self._table = pa.concat_tables([old, table])


def _replace(table: pa.Table, **columns: pa.Array) -> pa.Table:
    """``table`` with the named columns replaced (same position and field)."""
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), values)
    return table
