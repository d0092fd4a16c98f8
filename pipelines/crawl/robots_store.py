"""robots.txt decisions shared by every crawl process of one machine, across a crawl's rounds (SQLite, WAL mode).

Without it each crawl process fetched a host's robots.txt for itself, and each round again in new processes: with
``processes`` P and R rounds a host could be asked P x R times, and since every shard holds its share of every
host (``host_order.spread_hosts``), every process does meet every host. Here the first process (or the driver's
prefetch, :mod:`pipelines.crawl.robots_prefetch`) to need a host *claims* it in the store, fetches robots.txt and
writes the decision; the others wait for it (a claim lasts at most the fetch's deadline plus a margin, so a killed
claimant does not block anyone for longer) and read it. One request per host and machine, as RFC 9309 asks of a
crawler ("a crawler SHOULD NOT use a cached version for more than 24 hours": ``ttl``).

What is kept across rounds: a parsed 2xx answer (its text) and a 4xx "allow all". What is not: "unavailable" (5xx,
timeout: disallow all for this round only, so that a later round asks again, which is why those URLs are
retryable) and "no decision" (the host does not resolve or the guard blocks it): both are kept for their ``scope``
(one round of one crawl) only.

A request made by the prefetch is counted (``take_uncounted``) in the per-host statistics of the first shard that
uses the decision, so the crawl's report still adds up to what the hosts received. The time of the request is kept
too: the process that uses the decision does not request the host again sooner than its token bucket allows.

The store is a local file (``staging_dir``): executors on other machines have their own. SQLite errors (a full
disk, a file system without locks) switch the store off for the process, with one line in the log: each process
then decides for itself, as before.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass

from pipelines.crawl.robots import ALLOW_ALL, RULES, RobotsPolicy, parse_robots

DEFAULT_TTL = 24 * 3600.0
NO_DECISION = "none"  # fetch_robots returned None: the host's own requests will fail with their reason
CLAIM = "claim"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS robots (
    host TEXT PRIMARY KEY,
    kind TEXT NOT NULL,          -- rules, allow_all, disallow_all, none, or claim (being fetched)
    scope TEXT NOT NULL,         -- the crawl round that wrote it
    detail TEXT,
    status INTEGER,
    body BLOB,                   -- robots.txt's text, zlib-compressed, for rules
    at REAL NOT NULL,            -- wall time of the request (of the claim, while claimed)
    seconds REAL NOT NULL DEFAULT 0,
    uncounted INTEGER NOT NULL DEFAULT 0  -- a prefetch request no shard has counted yet
)
"""


@dataclass
class Decision:
    policy: RobotsPolicy | None  # None: no decision (the host's requests fail on their own)
    fetched_at: float  # wall time of the robots.txt request


class RobotsStore:
    """One SQLite file; one connection per thread and process."""

    def __init__(self, path: str, *, ttl: float = DEFAULT_TTL, claim_seconds: float = 10.0,
                 poll_seconds: float = 0.02):
        self.path, self.ttl, self.claim_seconds, self.poll_seconds = path, ttl, claim_seconds, poll_seconds
        self._local = threading.local()
        self.broken: str | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- plumbing
    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # a lost decision after a power cut is only fetched again
            conn.execute(_SCHEMA)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = f"{type(exc).__name__}: {exc}"
                print(f"robots.txt store {self.path} switched off in process {os.getpid()} ({self.broken}); this "
                      f"process decides robots.txt for itself", flush=True)

    @staticmethod
    def _decision(row) -> Decision:
        kind, detail, status, body, at = row
        if kind == NO_DECISION:
            return Decision(None, at)
        if kind == RULES:
            policy = parse_robots(zlib.decompress(body).decode("utf-8") if body else "")
            policy.status, policy.detail = status, detail or ""
        else:
            policy = RobotsPolicy(kind, detail or "", status=status)
        return Decision(policy, at)

    # ------------------------------------------------------------------------------------------------ the API
    _SELECT = "SELECT kind, scope, detail, status, body, at FROM robots WHERE host = ?"

    def _usable(self, row, scope: str, now: float):
        """What a stored row means now: a ``Decision``, False (another caller's live claim) or None (nothing
        usable: expired, for another round, damaged, or no row)."""
        if row is None:
            return None
        kind, row_scope, detail, status, body, at = row
        if kind == CLAIM:
            return False if now - at < self.claim_seconds else None
        if now - at > self.ttl or not (kind in (RULES, ALLOW_ALL) or row_scope == scope):
            return None
        try:
            return self._decision((kind, detail, status, body, at))
        except (zlib.error, UnicodeDecodeError):
            return None  # a damaged entry: fetched again

    def claim(self, host: str, scope: str, *, now: float | None = None):
        """``Decision`` when a usable one is stored; True when this caller now holds the claim (it must
        :meth:`put` a decision or :meth:`release`); False when another caller holds a live claim."""
        if self.broken:
            return True
        now = time.time() if now is None else now
        try:
            db = self._db()
            # A plain read first (WAL: it takes no lock that blocks the writers): most calls find a decision or a
            # claim, and only a caller that may claim takes the write lock, and reads again under it.
            found = self._usable(db.execute(self._SELECT, (host,)).fetchone(), scope, now)
            if found is not None:
                return found
            db.execute("BEGIN IMMEDIATE")
            try:
                found = self._usable(db.execute(self._SELECT, (host,)).fetchone(), scope, now)
                if found is None:
                    db.execute("INSERT OR REPLACE INTO robots (host, kind, scope, at) VALUES (?, ?, ?, ?)",
                               (host, CLAIM, scope, now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return True if found is None else found
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
            return True

    def wait(self, host: str, scope: str, *, deadline: float | None = None):
        """Claim, or wait while another caller holds the claim: a ``Decision`` or True (now ours)."""
        deadline = time.monotonic() + self.claim_seconds + 1.0 if deadline is None else deadline
        while True:
            got = self.claim(host, scope)
            if got is not False:
                return got
            if time.monotonic() >= deadline:  # a claim that outlives its own limit: ours now
                return True
            time.sleep(self.poll_seconds)

    def put(self, host: str, scope: str, policy: RobotsPolicy | None, *, fetched_at: float, seconds: float = 0.0,
            text: str | None = None, uncounted: bool = False) -> None:
        """Store the decision for ``host`` (``text``: robots.txt's body when ``policy`` has rules)."""
        if self.broken:
            return
        kind = NO_DECISION if policy is None else policy.kind
        detail = None if policy is None else policy.detail
        status = None if policy is None else policy.status
        try:
            self._db().execute(
                "INSERT OR REPLACE INTO robots (host, kind, scope, detail, status, body, at, seconds, uncounted) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (host, kind, scope, detail, status,
                 zlib.compress(text.encode("utf-8"), 6) if kind == RULES and text else None, fetched_at, seconds,
                 int(uncounted)))
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)

    def release(self, host: str) -> None:
        """Give up a claim without a decision (the fetch failed in clipline's own code)."""
        if self.broken:
            return
        try:
            self._db().execute("DELETE FROM robots WHERE host = ? AND kind = ?", (host, CLAIM))
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)

    def take_uncounted(self, host: str) -> float | None:
        """The seconds of a prefetch request for ``host`` that no shard has counted yet (then it is counted: one
        caller gets it), or None."""
        if self.broken:
            return None
        try:
            row = self._db().execute("UPDATE robots SET uncounted = 0 WHERE host = ? AND uncounted = 1 "
                                     "RETURNING seconds", (host,)).fetchone()
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
            return None
        return None if row is None else float(row[0])

    def remove(self) -> None:
        """Delete the store's files (the crawl is over; nothing may use it any more)."""
        self.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(self.path + suffix)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local = threading.local()


__all__ = ["CLAIM", "DEFAULT_TTL", "Decision", "NO_DECISION", "RobotsStore"]
