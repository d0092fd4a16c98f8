"""robots.txt fetched ahead of the crawl processes, by the process that runs the round (multiprocessing only).

While img2dataset's pool starts its worker processes (seconds: each imports img2dataset, albumentations, pyarrow
...), and then while they crawl, a few threads here walk the round's URL list in its order (the order the shards
are cut and crawled in), skip the shards already finished, and for each host not yet decided claim it in the
machine's :class:`~pipelines.crawl.robots_store.RobotsStore`, fetch its robots.txt through the same guarded opener
the workers use (SSRF guard, DNS cache, ``robots_timeout`` deadline, User-Agent) and store the decision. A crawl
process that reaches the host finds it decided (or waits for the claim) and does not ask the host again; so a
host's first image request no longer waits behind its robots.txt on a download thread, and on the real web, where
robots.txt takes a round trip to a new host (often a TLS handshake), that latency is off the shard's path.

Politeness is unchanged: one robots.txt request per host, never at the same time as a worker's request to it
(workers wait for the claim), and the worker's first image request keeps the host's rate after it (the request's
time is stored; :meth:`ShardScheduler.robots_done`). The request is counted in the per-host statistics of the first
shard that uses the decision.

Not with the pyspark distributor: executors on other machines have their own stores, and a driver-side fetch would
be a second request to every host.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time

import pyarrow.parquet as pq

from pipelines.crawl.politeness import host_key
from pipelines.crawl.robots import fetch_robots
from pipelines.crawl.robots_store import RobotsStore
from pipelines.crawl.ssrf import AddressPolicy, DnsCache, build_guarded_opener

SEEN_LIMIT = 1_000_000  # hosts remembered to skip repeats cheaply (a repeat past it costs one store lookup)


class RobotsPrefetch:
    """Start with :meth:`start`, end with :meth:`stop` (returns at once; fetches in flight end by their deadline)."""

    def __init__(self, store: RobotsStore, scope: str, url_list: str, *, settings, threads: int,
                 shard_size: int, done_shards: set[int]):
        self.store, self.scope, self.url_list, self.settings = store, scope, url_list, settings
        self.threads, self.shard_size, self.done_shards = max(1, threads), shard_size, set(done_shards)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="robots-prefetch")
        self.fetched = self.skipped = 0
        self.seconds = 0.0
        self.error: str | None = None
        self._count_lock = threading.Lock()

    def start(self) -> "RobotsPrefetch":
        self._thread.start()
        return self

    def stop(self, wait: float = 0.0) -> None:
        self._stop.set()
        self._thread.join(wait)

    def _hosts(self):
        """(host, first URL) in the URL list's order, shards already finished left out."""
        seen: set[str] = set()
        row = 0
        for batch in pq.ParquetFile(self.url_list).iter_batches(batch_size=65536, columns=["url"]):
            for url in batch.column(0).to_pylist():
                shard = row // self.shard_size
                row += 1
                if shard in self.done_shards or not isinstance(url, str):
                    continue
                host = host_key(url)
                if host in seen or host.startswith("invalid:"):
                    continue
                if len(seen) >= SEEN_LIMIT:
                    seen.clear()
                seen.add(host)
                yield host, url
                if self._stop.is_set():
                    return

    def _run(self) -> None:
        s = self.settings
        opener = build_guarded_opener(AddressPolicy(s.allow_cidrs), max_bytes=None, max_seconds=s.robots_timeout,
                                      resolver=DnsCache(s.dns_cache_seconds), images_only=False)
        slots = threading.BoundedSemaphore(self.threads * 2)  # a short queue: stop() leaves little behind

        def one(host: str, url: str) -> None:
            try:
                if self._stop.is_set() or self.store.claim(host, self.scope) is not True:
                    with self._count_lock:
                        self.skipped += 1
                    return
                fetched_at, t0 = time.time(), time.monotonic()
                try:
                    policy = fetch_robots(opener, url, user_agent=s.user_agent,
                                          timeout=min(s.op_timeout, s.robots_timeout))
                except BaseException:
                    self.store.release(host)
                    raise
                seconds = time.monotonic() - t0
                self.store.put(host, self.scope, policy, fetched_at=fetched_at, seconds=seconds,
                               text=policy.text if policy is not None else None, uncounted=True)
                with self._count_lock:
                    self.fetched += 1
                    self.seconds += seconds
            finally:
                slots.release()

        pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="robots-prefetch")
        try:
            for host, url in self._hosts():
                while not slots.acquire(timeout=0.2):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    slots.release()
                    return
                pool.submit(one, host, url)
        except Exception as exc:  # noqa: BLE001 - the prefetch is an optimisation: the workers decide without it
            self.error = f"{type(exc).__name__}: {exc}"
        finally:  # stopped: queued fetches are dropped; else the last ones finish (each within its deadline)
            stopped = self._stop.is_set()
            pool.shutdown(wait=not stopped, cancel_futures=stopped)


__all__ = ["RobotsPrefetch"]
