"""Per-host politeness of the crawl scheduler, without a network: threads take URLs from a ShardScheduler and
"fetch" them with a fake that records when each request started and ended and answers what the test says."""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from pipelines.crawl.politeness import (Politeness, PolitenessSettings, ShardScheduler, host_key,
                                        process_politeness, reset_process_state)


class FakeWeb:
    """Answers per host: ``answer(host, n)`` -> (reason, http_status, retry_after, seconds) for the host's n-th
    request; records per host every request's (start, end) and the most requests at once."""

    def __init__(self, answer):
        self.answer = answer
        self.lock = threading.Lock()
        self.log: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        self.active: dict[str, int] = defaultdict(int)
        self.max_active: dict[str, int] = defaultdict(int)
        self.count: dict[str, int] = defaultdict(int)

    def fetch(self, host: str, url: str):
        with self.lock:
            self.count[host] += 1
            n = self.count[host]
            self.active[host] += 1
            self.max_active[host] = max(self.max_active[host], self.active[host])
        t0 = time.monotonic()
        reason, status, retry_after, seconds = self.answer(host, n, url)
        time.sleep(seconds)
        with self.lock:
            self.active[host] -= 1
            self.log[host].append((t0, time.monotonic(), url))
        return reason, status, retry_after


def run(items, web: FakeWeb, settings: PolitenessSettings, threads: int = 8, retries: int = 0):
    """Run a shard's URLs through the scheduler; returns {url: (reason, finished_at)} and the scheduler."""
    sched = ShardScheduler(Politeness(settings), list(enumerate(items)), respect_robots=False)
    results: dict[str, tuple[str | None, float]] = {}
    lock = threading.Lock()

    def loop():
        while (task := sched.take()) is not None:
            if task.skip_reason:
                sched.finish(task, reason=task.skip_reason, requested=False)
                with lock:
                    results[task.url] = (task.skip_reason, time.monotonic())
                continue
            task.attempts += 1
            reason, status, retry_after = web.fetch(task.host, task.url)
            retry = reason in ("http_429", "http_5xx") and task.attempts <= retries
            if sched.finish(task, reason=reason, http_status=status, retry_after=retry_after, retry=retry):
                with lock:
                    results[task.url] = (reason, time.monotonic())

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in ts)
    assert len(results) == len(items)
    return results, sched


def urls(host: str, n: int, prefix: str = "u") -> list[str]:
    return [f"http://{host}/{prefix}{i}.jpg" for i in range(n)]


def ok(seconds: float = 0.02):
    return lambda host, n, url: (None, 200, None, seconds)


def test_host_key():
    assert host_key("http://Example.org/a.jpg") == "http://example.org:80"
    assert host_key("https://example.org:8443/a") == "https://example.org:8443"
    assert host_key("not a url").startswith("invalid:")


def test_connection_limit_and_rate_per_host():
    web = FakeWeb(ok(0.05))
    items = [u for i in range(20) for u in (f"http://a/{i}.jpg", f"http://b/{i}.jpg", f"http://c/{i}.jpg")]
    run(items, web, PolitenessSettings(connections=2, rps=20.0), threads=12)
    for h in ("a", "b", "c"):
        key = f"http://{h}:80"
        assert web.max_active[key] <= 2
        starts = sorted(s for s, _e, _u in web.log[key])
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert min(gaps) >= 1 / 20 - 0.005, min(gaps)  # token bucket, burst 1
        # any 1-second window holds at most rps + 1 requests
        assert max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts) <= 21
    # 12 threads for 3 hosts x 2 connections: the hosts really were fetched in parallel
    assert sum(web.max_active.values()) >= 5


def test_a_slow_host_with_many_urls_does_not_hold_up_the_others():
    slow = "http://slow:80"

    def answer(host, n, url):
        return None, 200, None, 0.3 if host == slow else 0.01

    web = FakeWeb(answer)
    items = urls("slow", 30) + urls("fast", 30)  # the slow host's URLs come first in the shard
    results, _ = run(items, web, PolitenessSettings(connections=2, rps=None), threads=8)
    fast_done = max(t for u, (_r, t) in results.items() if "//fast" in u)
    slow_done = max(t for u, (_r, t) in results.items() if "//slow" in u)
    t0 = min(s for log in web.log.values() for s, _e, _u in log)
    assert fast_done - t0 < 1.5  # 30 fast URLs at 2 at a time, not after the slow host's 30 x 0.3 / 2 = 4.5 s
    assert slow_done - t0 >= 4.0
    assert web.max_active[slow] <= 2


def test_a_failing_host_is_paused_and_its_other_urls_are_not_requested():
    bad = "http://bad:80"

    def answer(host, n, url):
        if host == bad:
            return "timeout_headers", None, None, 0.05
        return None, 200, None, 0.01

    web = FakeWeb(answer)
    results, sched = run(urls("bad", 40) + urls("good", 20), web,
                         PolitenessSettings(connections=2, rps=None, failure_limit=5, pause_seconds=60))
    assert 5 <= web.count[bad] <= 6  # the limit, plus at most the request in flight on the other connection
    reasons = [r for u, (r, _t) in results.items() if "//bad" in u]
    assert reasons.count("host_unavailable") == 40 - web.count[bad]
    assert all(r is None for u, (r, _t) in results.items() if "//good" in u)
    assert sched.stats[bad].unavailable == 40 - web.count[bad] and sched.stats[bad].pauses == 1


def test_slow_urls_already_in_flight_do_not_pause_a_healthy_host():
    host = "http://h:80"
    # Requests 1-4 are slow and time out; every request started after them succeeds first.
    def answer(h, n, url):
        return ("timeout_headers", None, None, 0.4) if n <= 4 else (None, 200, None, 0.01)

    web = FakeWeb(answer)
    results, _ = run(urls("h", 30), web, PolitenessSettings(connections=8, rps=None, failure_limit=3))
    assert sum(r == "host_unavailable" for r, _t in results.values()) == 0
    assert web.count[host] == 30


def test_retry_after_pauses_the_host():
    host = "http://t:80"

    def answer(h, n, url):
        return ("http_429", 429, 1.0, 0.0) if n == 1 else (None, 200, None, 0.0)

    web = FakeWeb(answer)
    results, sched = run(urls("t", 5), web, PolitenessSettings(connections=2, rps=None, max_retry_after=30),
                         retries=1)
    throttled_end = min(e for s, e, _u in web.log[host])  # the first request (the 429) ends first
    later = sorted(s for s, _e, _u in web.log[host] if s > throttled_end + 0.05)
    # Nothing new is started for Retry-After seconds (a request racing the 429's arrival is tolerated above).
    assert later and later[0] >= throttled_end + 1.0 - 0.01, (throttled_end, later)
    assert all(r is None for r, _t in results.values())  # the throttled URL was retried after the pause
    assert sched.stats[host].http_429 == 1


def test_retry_after_is_capped():
    host = "http://t:80"

    def answer(h, n, url):
        return ("http_429", 429, 3600.0, 0.0) if n == 1 else (None, 200, None, 0.0)

    web = FakeWeb(answer)
    run(urls("t", 3), web, PolitenessSettings(connections=1, rps=None, max_retry_after=0.5))
    starts = sorted(s for s, _e, _u in web.log[host])
    assert 0.45 <= starts[1] - starts[0] < 2.0


def test_repeated_5xx_back_off_exponentially():
    host = "http://e:80"
    web = FakeWeb(lambda h, n, url: ("http_5xx", 500, None, 0.0))
    run(urls("e", 5), web, PolitenessSettings(connections=1, rps=None, backoff_base=0.1, max_retry_after=10))
    starts = sorted(s for s, _e, _u in web.log[host])
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # a lone 5xx costs nothing; from the second in a row on: 0.1, 0.2, 0.4 s
    assert gaps[0] < 0.08 and gaps[1] >= 0.095 and gaps[2] >= 0.195 and gaps[3] >= 0.395, gaps


def test_process_state_is_shared_and_resettable():
    s = PolitenessSettings(connections=3)
    assert process_politeness(s) is process_politeness(s)
    reset_process_state()
    p = process_politeness(s)
    assert p.hosts == {}


@pytest.mark.parametrize("rps", [5.0, None])
def test_every_url_ends_once(rps):
    web = FakeWeb(ok(0.0))
    items = urls("a", 7) + urls("b", 3) + ["not a url"]
    results, _ = run(items, web, PolitenessSettings(connections=1, rps=rps and 100.0), threads=3)
    assert sorted(results) == sorted(items)
