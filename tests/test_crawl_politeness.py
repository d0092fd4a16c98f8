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


def test_spread_hosts_gives_every_shard_its_fair_share_of_each_host():
    from collections import Counter

    from pipelines.crawl.host_order import spread_hosts

    # uid order puts a host's URLs into shards by chance; here the worst case: each host's URLs in one block
    items = urls("big", 60, "b") + urls("mid", 30, "m") + urls("one", 1, "o")
    items += [f"http://h{i}/x.jpg" for i in range(29)]
    order = spread_hosts(items).tolist()
    assert sorted(order) == list(range(len(items)))
    assert order == spread_hosts(items).tolist()  # deterministic
    spread = [items[i] for i in order]
    for shard in range(4):  # 120 URLs in shards of 30: big 15 +- 1, mid 7.5 +- 1 per shard
        counts = Counter(host_key(u) for u in spread[30 * shard:30 * (shard + 1)])
        assert 14 <= counts["http://big:80"] <= 16, counts
        assert 6 <= counts["http://mid:80"] <= 9, counts
    for h, prefix in (("big", "b"), ("mid", "m")):  # a host's URLs keep their order
        mine = [u for u in spread if u.startswith(f"http://{h}/")]
        assert mine == urls(h, 60 if h == "big" else 30, prefix)


def _spread_hosts_per_url(urls: list[str]) -> list[int]:
    """The reference: host_key and the spread key computed URL by URL, in Python."""
    import collections
    import hashlib

    hosts = [host_key(u) for u in urls]
    counts = collections.Counter(hosts)
    offsets = {h: int.from_bytes(hashlib.sha256(h.encode()).digest()[:8], "big") / 2.0 ** 64 for h in counts}
    seen: collections.Counter = collections.Counter()
    keys = []
    for h in hosts:
        keys.append((seen[h] + offsets[h]) / counts[h])
        seen[h] += 1
    return sorted(range(len(urls)), key=keys.__getitem__)


def test_spread_hosts_column_wise_equals_the_per_url_order():
    """host keys come from each distinct scheme + authority prefix, the order from numpy: the same host of every
    URL and the same order as computing both URL by URL, odd URLs included."""
    import random

    import pyarrow as pa

    from pipelines.crawl.host_order import host_ids, spread_hosts

    odd = ["HTTP://Example.ORG/a.jpg", "http://example.org:80/b.jpg", "https://example.org/c", "https://example.org:443",
           "http://user:pw@example.org/d", "http://[::1]:8080/e", "http://[::1/broken", "http://a.test:abc/f",
           "http://a.test:99999/g", "not a url", "", "mailto:x@y.z", "//no-scheme.test/h", "ftp://files.test/i",
           "  http://spaces.test/j", "http://tab\t.test/k", "http://a.test?q=1", "http://a.test#frag",
           "http://bücher.test/l", "http://a.test:abc/other", "HTTPS://EXAMPLE.org:8443/m", "http:///nohost"]
    rng = random.Random(3)
    hosts = [f"http://h{i}.test" for i in range(40)] + ["https://big.test", "http://10.0.0.1:8000"]
    urls = [f"{rng.choice(hosts)}/img/{k}.jpg" for k in range(2000)] + odd * 3
    rng.shuffle(urls)
    ids, keys = host_ids(urls)
    assert [keys[i] for i in ids] == [host_key(u) for u in urls]
    expected = _spread_hosts_per_url(urls)
    assert spread_hosts(urls).tolist() == expected
    assert spread_hosts(pa.chunked_array([urls[:700], urls[700:]])).tolist() == expected
    assert spread_hosts([]).tolist() == []


class FakeClock:
    """politeness's clock, moved by the test (starts ahead of the real one: host states stamp it at creation)."""

    def __init__(self):
        self.now = time.monotonic() + 1000.0

    def monotonic(self):
        return self.now


class SleeplessCondition:
    """A condition variable for one thread on a fake clock: waiting moves the clock by the timeout."""

    def __init__(self, clock: FakeClock):
        self.clock, self.lock = clock, threading.RLock()

    def __enter__(self):
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)

    def wait(self, timeout=None):
        assert timeout is not None, "a single thread would wait for ever"
        self.clock.now += timeout

    def notify(self, n=1):
        pass

    def notify_all(self):
        pass


def test_the_host_with_most_urls_left_is_served_whenever_its_token_allows(monkeypatch):
    import pipelines.crawl.politeness as P

    clock = FakeClock()
    monkeypatch.setattr(P, "time", clock)
    # One thread, requests of 0.01 s, 5 requests/s per host. A host with 12 URLs among 30 hosts with 4: the shard
    # lasts at least as long as the big host needs (11 x 0.2 s), so each of its tokens must be used at once.
    # Round-robin served it once per turn of the 31 hosts (0.31 s) while the others had URLs left.
    items = [u for i in range(4) for h in range(30) for u in urls(f"h{h}", 4)[i:i + 1]] + urls("big", 12, "b")
    politeness = Politeness(PolitenessSettings(connections=2, rps=5.0))
    politeness.cond = SleeplessCondition(clock)
    sched = ShardScheduler(politeness, list(enumerate(items)), respect_robots=False)
    served: dict[str, list[float]] = defaultdict(list)
    while (task := sched.take()) is not None:
        served[task.host].append(clock.now)
        clock.now += 0.01
        sched.finish(task, reason=None, http_status=200)
    assert sum(len(v) for v in served.values()) == len(items)
    big = served["http://big:80"]
    gaps = [b - a for a, b in zip(big, big[1:])]
    assert max(gaps) <= 0.2 + 0.01 + 1e-6, gaps  # at most one request late
    assert big[-1] - big[0] <= 11 * 0.21
    for h, times in served.items():  # and no host faster than its token bucket allows
        assert all(b - a >= 0.2 - 1e-6 for a, b in zip(times, times[1:])), (h, times)


def test_a_host_at_its_connection_limit_waits_and_is_served_again_when_one_ends(monkeypatch):
    import pipelines.crawl.politeness as P

    clock = FakeClock()
    monkeypatch.setattr(P, "time", clock)
    sched = ShardScheduler(Politeness(PolitenessSettings(connections=2, rps=None)),
                           list(enumerate(urls("a", 4) + urls("b", 1))), respect_robots=False)
    first, second = sched.take(), sched.take()
    assert (first.host, second.host) == ("http://a:80", "http://a:80")
    third = sched.take()  # a has 2 in flight: b, although a has more URLs left
    assert third.host == "http://b:80"
    sched.finish(first, reason=None, http_status=200)
    assert sched.take().host == "http://a:80"  # the slot that came free goes to a again
    sched.finish(second, reason="http_5xx", http_status=500, retry=True)  # a retry goes back to the front
    task = sched.take()
    assert task.host == "http://a:80" and task.url == second.url
