"""Per-host politeness for the crawl: connection limits, a token bucket, back-off, pauses, and a scheduler that
interleaves hosts so that one slow or throttled host never holds up the others.

State per host (``scheme://host:port``) lives in one :class:`Politeness` object per crawl process and is shared by
all of its download threads and by the shards the process runs one after the other:

- at most ``connections`` requests in flight, and a token bucket of ``rps`` requests per second (burst 1, so two
  requests are at least 1/rps apart);
- a 429 or 503 with ``Retry-After`` pauses the host for that long (capped); without it, 429s pause for
  ``backoff_base * 2^(k-1)`` and 5xx from the second in a row on (``k`` = 429/5xx in a row; capped);
- ``failure_limit`` connect errors / timeouts in a row pause the host for ``pause_seconds``: its queued URLs end as
  ``host_unavailable`` (retryable in a later round) and are not requested. "In a row" counts requests *started*
  after the host's last good answer, so a handful of slow URLs that were already in flight when later requests
  succeeded do not pause a healthy host. After the pause one failure pauses it again (probation).

Several processes (``processes`` > 1, or Spark executors): each process enforces its share of the crawl's limits
(``CrawlConfig.per_process_connections`` = connections // processes, at least 1; ``per_process_rps`` = rps /
processes). Why a static split and not a shared limiter (a Redis token bucket, a lock server): img2dataset cuts the
URL list into shards and hands each shard to one process, and every shard holds URLs of the same many hosts, so
each process really does talk to each host and a fair share per process is what the whole crawl needs; a split
needs no service next to the crawl, works the same under the multiprocessing and Spark distributors and cannot
fail or slow down with it. What it costs: a host whose URLs all land in one process's shard is crawled at 1/P of
its allowance (slower, not ruder). One exception: every process keeps at least one connection, so with more
processes than ``per_host_connections`` a host can see up to ``processes`` connections at once (the request rate
stays bounded); keep ``processes`` <= ``per_host_connections`` where that matters, or lower the rate. DNS is
cached per process. robots.txt is not split: the crawl processes of a machine share one decision per host through
:mod:`pipelines.crawl.robots_store` (one request per host and machine, for all the crawl's rounds), and the process
that uses a decision another made keeps the host's rate after that request.

The scheduler (:class:`ShardScheduler`) hands a thread the next URL of the host, among those that may be requested
now, with the most URLs left in the shard (its critical path); when none may, the thread sleeps until the earliest
moment one may (a token, the end of a pause) or until a request finishes. URLs of one host keep their order.
:func:`pipelines.crawl.host_order.spread_hosts` orders a round's URL list so that each shard holds its fair share of every host.
"""
from __future__ import annotations

import collections
import heapq
import math
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pipelines.core import reasons as R
from pipelines.crawl.robots import ALLOW_ALL, RULES
from pipelines.crawl.robots_store import DEFAULT_TTL

# Failures that say the host (not one URL) is in trouble: they count towards pausing it.
HOST_FAILURES = frozenset({R.TIMEOUT, R.TIMEOUT_HEADERS, R.TIMEOUT_BODY, R.CONNECTION_REFUSED, R.CONNECTION_ERROR,
                           R.DNS_ERROR, R.TLS_ERROR})
ROBOTS_UNKNOWN, ROBOTS_FETCHING, ROBOTS_KNOWN = 0, 1, 2


def host_key(url: str) -> str:
    """``scheme://host:port`` of a URL (default ports made explicit); unparsable URLs get a key of their own."""
    key = netloc_key(url)
    return f"invalid:{url[:200]}" if key is None else key


def netloc_key(url: str) -> str | None:
    """:func:`host_key` from the URL's scheme and netloc alone; None where urlsplit refuses the netloc."""
    try:
        parts = urlsplit(url)
        scheme = (parts.scheme or "").lower()
        host = (parts.hostname or "").lower()
        port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    except ValueError:
        return None
    if not host:
        return f"invalid:{scheme}"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class PolitenessSettings:
    connections: int = 2
    rps: float | None = 5.0
    failure_limit: int = 5
    pause_seconds: float = 600.0
    max_retry_after: float = 60.0
    backoff_base: float = 1.0


@dataclass
class HostStats:
    """What one host cost and answered (per shard; summed over shards and rounds for the report)."""

    requests: int = 0  # requests sent (robots.txt included, retries included)
    downloaded: int = 0  # URLs whose body was downloaded (decoding and checks come after)
    failures: int = 0  # URLs that ended without a body (HTTP errors, timeouts, robots, paused host...)
    http_429: int = 0
    http_5xx: int = 0
    timeouts: int = 0
    robots_disallowed: int = 0  # URLs not requested because of robots.txt (disallowed or unavailable)
    unavailable: int = 0  # URLs not requested because the host was paused
    pauses: int = 0  # times the host was paused (back-off or failures)
    seconds: float = 0.0  # wall time spent in requests to it

    def add(self, other: "HostStats") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["seconds"] = round(d["seconds"], 3)
        return d


@dataclass
class HostState:
    """Process-wide state of one host."""

    active: int = 0
    tokens: float = 1.0
    refilled: float = field(default_factory=time.monotonic)
    paused_until: float = 0.0
    throttled_in_a_row: int = 0  # 429/5xx answers in a row
    seq: int = 0  # requests started
    last_good_seq: int = 0  # start number of the latest request the host answered properly
    failed_seqs: set = field(default_factory=set)  # host failures of requests started after last_good_seq
    unavailable_until: float = 0.0
    probation: bool = False
    robots_state: int = ROBOTS_UNKNOWN
    robots: object = None  # a robots.RobotsPolicy, or None (no decision)
    robots_scope: str = ""  # the round that decided it
    robots_at: float = 0.0  # monotonic time of the decision

    def refill(self, now: float, rps: float | None) -> None:
        if rps is None:
            self.tokens = 1.0
            return
        self.tokens = min(1.0, self.tokens + (now - self.refilled) * rps)
        self.refilled = now

    def token_ready_at(self, now: float, rps: float | None) -> float:
        self.refill(now, rps)
        return now if self.tokens >= 1.0 - 1e-9 else now + (1.0 - self.tokens) / rps  # type: ignore[operator]


class Politeness:
    """The host table of one crawl process (shared by threads; guarded by one condition variable)."""

    def __init__(self, settings: PolitenessSettings):
        self.settings = settings
        self.cond = threading.Condition()
        self.hosts: dict[str, HostState] = {}

    def host(self, key: str) -> HostState:
        st = self.hosts.get(key)
        if st is None:
            st = self.hosts[key] = HostState()
        return st

    def paused_hosts(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self.cond:
            return sorted(k for k, s in self.hosts.items() if s.unavailable_until > now)

    # -- called with self.cond held
    def _start_request(self, st: HostState, now: float) -> int:
        st.refill(now, self.settings.rps)
        st.tokens -= 1.0
        st.seq += 1
        return st.seq

    def record(self, key: str, seq: int, *, reason: str | None, http_status: int | None,
               retry_after: float | None, stats: HostStats) -> None:
        """Update ``key``'s state with the outcome of the request numbered ``seq`` (call with the lock held)."""
        s = self.settings
        st = self.host(key)
        now = time.monotonic()
        throttled = http_status == 429 or (http_status is not None and 500 <= http_status < 600)
        if throttled:
            st.throttled_in_a_row += 1
            k = st.throttled_in_a_row
            if retry_after is not None and http_status in (429, 503):
                delay = retry_after
            elif http_status == 429:
                delay = s.backoff_base * 2 ** (k - 1)
            else:  # a lone 5xx is one URL's problem; from the second in a row on the host backs off
                delay = 0.0 if k == 1 else s.backoff_base * 2 ** (k - 2)
            delay = min(s.max_retry_after, max(0.0, delay))
            if delay > 0:
                st.paused_until = max(st.paused_until, now + delay)
                stats.pauses += 1
        elif reason in HOST_FAILURES:
            if seq > st.last_good_seq:
                st.failed_seqs.add(seq)
            if len(st.failed_seqs) >= s.failure_limit or st.probation:
                if st.unavailable_until <= now:
                    stats.pauses += 1
                st.unavailable_until = now + s.pause_seconds
                st.probation = False
        else:  # an answer that says the host is fine (an image, a 404, a refused content type...)
            st.throttled_in_a_row = 0
            st.probation = False
            if seq > st.last_good_seq:
                st.last_good_seq = seq
                st.failed_seqs = {x for x in st.failed_seqs if x > seq}


@dataclass
class Task:
    key: int  # img2dataset's sample index in the shard
    url: str
    host: str
    attempts: int = 0  # requests made for this URL so far (this round)
    seq: int = 0  # the host's request number of the current attempt
    fetch_robots: bool = False  # this thread must fetch the host's robots.txt first
    skip_reason: str | None = None  # end without a request (host paused)
    seconds: float = 0.0  # time spent in requests for this URL
    timeouts: int = 0  # attempts that timed out


class ShardScheduler:
    """Hands out the URLs of one shard to download threads under the process's host limits.

    Which host next: of the hosts that may be requested now, the one with the most URLs still queued (ties: the
    one waiting longest). A shard ends when its last URL does, so a host with many URLs in it is its critical
    path, and every token of that host left unused lengthens the shard; hosts with few URLs fill the gaps while
    it waits for its next token. (Round-robin over hosts, what this replaced, served a host once per turn of the
    ring: with 200 hosts and 9 URLs of one host in a shard, a turn took 0.4 s of requests at 500 images/s, so that
    host got 2.5 of its 5 requests/s and the shard took twice as long as the limit needs.)

    Hosts are kept in three places: ``ready`` (a heap by queued URLs, may be requested now as far as this
    scheduler knows), ``timed`` (a heap by the time its next token or the end of its pause comes) and ``blocked``
    (all its connections busy, or its robots.txt being fetched: back to ``ready`` when a request to it ends).
    Entries are checked when taken out (the host's state may have changed meanwhile) and an entry superseded by a
    newer one for the same host is skipped, so each step costs O(log hosts), not a scan of every host.
    """

    def __init__(self, politeness: Politeness, items: list[tuple[int, str]], *, respect_robots: bool,
                 robots_scope: str = ""):
        self.p = politeness
        self.respect_robots = respect_robots
        self.robots_scope = robots_scope
        self.queues: dict[str, collections.deque] = {}
        for key, url in items:
            h = host_key(url)
            self.queues.setdefault(h, collections.deque()).append(Task(key, url, h))
        self.n_queued = len(items)
        self.in_flight = 0
        self.closed = False
        self.stats: dict[str, HostStats] = collections.defaultdict(HostStats)
        self.ready: list = []  # (-queued URLs, tick, version, host)
        self.timed: list = []  # (time it may be requested, tick, version, host)
        self.blocked: set[str] = set()
        self.version: dict[str, int] = collections.defaultdict(int)  # entries with an older version are stale
        self.tick = 0
        for h in self.queues:
            self._push_ready(h)

    def _queued(self) -> int:
        return self.n_queued

    # -- host placement (called with the lock held)
    def _push_ready(self, h: str) -> None:
        self.version[h] += 1
        self.tick += 1
        self.blocked.discard(h)
        heapq.heappush(self.ready, (-len(self.queues[h]), self.tick, self.version[h], h))

    def _push_timed(self, h: str, when: float) -> None:
        self.version[h] += 1
        self.tick += 1
        self.blocked.discard(h)
        heapq.heappush(self.timed, (when, self.tick, self.version[h], h))

    def _block(self, h: str) -> None:
        self.version[h] += 1
        self.blocked.add(h)

    def _place(self, h: str, now: float) -> None:
        """Put host ``h`` where its state says (nowhere when it has no queued URL)."""
        if not self.queues.get(h):
            self.version[h] += 1
            self.blocked.discard(h)
            return
        st = self.p.host(h)
        if st.unavailable_until > now:  # its URLs end at once, without a request
            self._push_ready(h)
        elif st.robots_state == ROBOTS_FETCHING or st.active >= self.p.settings.connections:
            self._block(h)
        else:
            when = max(st.paused_until, st.token_ready_at(now, self.p.settings.rps))
            if when > now:
                self._push_timed(h, when)
            else:
                self._push_ready(h)

    def take(self) -> Task | None:
        """The next task for a thread, or None when the shard has no more work for it."""
        p, s = self.p, self.p.settings
        with p.cond:
            while True:
                if self.closed:
                    return None
                if self.n_queued <= 0:
                    if self.in_flight <= 0:
                        p.cond.notify_all()  # the shard is done: every waiting thread may leave
                        return None
                    p.cond.wait(0.5)  # a request in flight may be retried
                    continue
                now = time.monotonic()
                while self.timed and self.timed[0][0] <= now:
                    _, _, v, h = heapq.heappop(self.timed)
                    if v == self.version[h]:
                        self._push_ready(h)
                if not self.ready and self.blocked:
                    for h in list(self.blocked):  # a host's state may also change outside this shard
                        self._place(h, now)
                while self.ready:
                    _, _, v, h = heapq.heappop(self.ready)
                    if v != self.version[h]:
                        continue  # superseded
                    st = p.host(h)
                    q = self.queues[h]
                    if not q:
                        continue
                    if st.unavailable_until > now:  # paused host: its URLs end without a request
                        task = q.popleft()
                        self.n_queued -= 1
                        task.skip_reason = R.HOST_UNAVAILABLE
                        self.stats[h].unavailable += 1
                        self.in_flight += 1
                        self._place(h, now)
                        p.cond.notify()  # there may be more to hand out: wake one more thread (a chain)
                        return task
                    if st.unavailable_until and not st.probation and st.unavailable_until <= now:
                        st.unavailable_until, st.probation, st.failed_seqs = 0.0, True, set()
                    if st.robots_state == ROBOTS_FETCHING or st.active >= s.connections:
                        self._block(h)
                        continue
                    when = max(st.paused_until, st.token_ready_at(now, s.rps))
                    if when > now:
                        self._push_timed(h, when)
                        continue
                    task = q.popleft()
                    self.n_queued -= 1
                    st.active += 1
                    task.seq = p._start_request(st, now)
                    if self.respect_robots and st.robots_state == ROBOTS_KNOWN and self._robots_stale(st, now):
                        st.robots_state = ROBOTS_UNKNOWN
                    if self.respect_robots and st.robots_state == ROBOTS_UNKNOWN:
                        st.robots_state = ROBOTS_FETCHING
                        task.fetch_robots = True
                    self.in_flight += 1
                    self._place(h, now)
                    p.cond.notify()  # there may be more to hand out: wake one more thread (a chain)
                    return task
                wake = self.timed[0][0] if self.timed else math.inf
                if self.blocked:
                    wake = min(wake, now + 0.5)
                p.cond.wait(None if wake == math.inf else max(0.001, wake - now))

    def close(self) -> None:
        """No more tasks: threads still waiting in :meth:`take` return None."""
        with self.p.cond:
            self.closed = True
            self.p.cond.notify_all()

    def _put_back(self, task: Task) -> None:
        """``task`` first in its host's queue again (lock held)."""
        q = self.queues[task.host]
        q.appendleft(task)
        self.n_queued += 1
        self._place(task.host, time.monotonic())

    def requeue(self, task: Task) -> None:
        """Give the task's slot back and put it first in its host's queue, to be handed out again when the host
        may be requested (e.g. after its robots.txt: the image is a second request and waits for a token, but no
        thread should sleep for it while other hosts are ready)."""
        with self.p.cond:
            self.in_flight -= 1
            self.p.host(task.host).active -= 1
            task.fetch_robots = False
            self._put_back(task)
            self.p.cond.notify()

    def _robots_stale(self, st: HostState, now: float) -> bool:
        """A decision this process holds that no longer applies (a process that lives across rounds or crawls,
        e.g. a reused Spark Python worker): older than a day (RFC 9309), or "unavailable" / "no decision" from
        another round (which asks again: that is why those URLs are retryable)."""
        if now - st.robots_at > DEFAULT_TTL:
            return True
        definitive = st.robots is not None and getattr(st.robots, "kind", None) in (RULES, ALLOW_ALL)
        return not definitive and st.robots_scope != self.robots_scope

    def robots_done(self, task: Task, policy, *, last_request_wall: float | None = None) -> bool:
        """Record the host's robots.txt decision. ``last_request_wall``: when the decision came from another
        process, the wall time of its robots.txt request; the token this task took is then its image request's,
        unless that request would come sooner than the host's rate allows after the robots.txt one: then the
        token is given back, the bucket set to refill no sooner, and True returned (requeue the task)."""
        wait = False
        with self.p.cond:
            st = self.p.host(task.host)
            now = time.monotonic()
            st.robots, st.robots_state, st.robots_scope, st.robots_at = policy, ROBOTS_KNOWN, self.robots_scope, now
            rps = self.p.settings.rps
            if last_request_wall is not None and rps:
                earliest = now - max(0.0, time.time() - last_request_wall) + 1.0 / rps
                if earliest > now:
                    st.refill(now, rps)
                    st.tokens = min(1.0, st.tokens + 1.0, 1.0 - (earliest - now) * rps)
                    wait = True
            if task.host in self.blocked:
                self._place(task.host, now)
            self.p.cond.notify_all()
        return wait

    def finish(self, task: Task, *, reason: str | None, http_status: int | None = None,
               retry_after: float | None = None, requested: bool = True, retry: bool = False) -> bool:
        """Record a finished attempt; with ``retry`` the URL goes back to the front of its host's queue (after
        any pause). Returns True when the URL is finished (no retry)."""
        p = self.p
        with p.cond:
            self.in_flight -= 1
            hs = self.stats[task.host]
            if task.skip_reason is None and requested:
                st = p.host(task.host)
                st.active -= 1
                p.record(task.host, task.seq, reason=reason, http_status=http_status, retry_after=retry_after,
                         stats=hs)
                if st.unavailable_until > time.monotonic():
                    retry = False
            elif task.skip_reason is None:  # decided without a request (robots.txt): only the slot is given back
                p.host(task.host).active -= 1
            if task.host in self.blocked:  # a connection came free
                self._place(task.host, time.monotonic())
            if http_status == 429:
                hs.http_429 += 1
            elif http_status is not None and 500 <= http_status < 600:
                hs.http_5xx += 1
            if retry:
                task.fetch_robots = False
                self._put_back(task)
            else:
                if reason is None:
                    hs.downloaded += 1
                else:
                    hs.failures += 1
                    if reason in (R.ROBOTS_DISALLOWED, R.ROBOTS_UNAVAILABLE):
                        hs.robots_disallowed += 1
            # A slot came free (or a URL came back): one thread can use it; it wakes the next if there is more.
            # Waking all of them would make every thread scan every host after every request.
            p.cond.notify(1 if self.in_flight > 0 or self.n_queued else 2)
            if not self.n_queued and self.in_flight <= 0:
                p.cond.notify_all()
            return not retry

    def count_request(self, host: str, seconds: float, timed_out: bool) -> None:
        with self.p.cond:
            hs = self.stats[host]
            hs.requests += 1
            hs.seconds += seconds
            hs.timeouts += int(timed_out)


_registry: dict[PolitenessSettings, Politeness] = {}
_registry_lock = threading.Lock()


def process_politeness(settings: PolitenessSettings) -> Politeness:
    """The host table of this process for ``settings`` (created on first use, kept for the process's life)."""
    with _registry_lock:
        p = _registry.get(settings)
        if p is None:
            p = _registry[settings] = Politeness(settings)
        return p


def reset_process_state() -> None:
    """Forget every host (tests; a new crawl in a long-lived process)."""
    with _registry_lock:
        _registry.clear()
