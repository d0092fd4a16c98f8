"""robots.txt decided once per host for a machine's crawl processes and a crawl's rounds: the SQLite store (claims,
scopes, expiry, processes racing), and crawls with two processes and two rounds measured on real servers."""
from __future__ import annotations

import multiprocessing
import time

import pytest

from pipelines.crawl import CrawlConfig, crawl_all, host_report
from pipelines.crawl.robots import ALLOW_ALL, DISALLOW_ALL, RobotsPolicy, parse_robots
from pipelines.crawl.robots_store import Decision, RobotsStore
from pipelines.synthweb.hostile import HostileWeb, HostSpec
from tests.crawl_fixtures import write_candidates

RULES_TEXT = "User-agent: *\nDisallow: /private/\n"


def test_a_claim_is_exclusive_until_a_decision_is_stored(tmp_path):
    a, b = RobotsStore(str(tmp_path / "r.sqlite")), RobotsStore(str(tmp_path / "r.sqlite"))
    assert a.claim("http://h:80", "round-0") is True
    assert b.claim("http://h:80", "round-0") is False  # a holds it
    policy = parse_robots(RULES_TEXT)
    a.put("http://h:80", "round-0", policy, fetched_at=time.time(), text=RULES_TEXT)
    got = b.claim("http://h:80", "round-0")
    assert isinstance(got, Decision)
    assert got.policy.can_fetch("clipline", "http://h/private/x.jpg") == (False, "robots_disallowed")
    assert got.policy.can_fetch("clipline", "http://h/ok/x.jpg") == (True, None)


def test_only_definitive_decisions_outlive_their_round(tmp_path):
    store = RobotsStore(str(tmp_path / "r.sqlite"))
    now = time.time()
    for host, policy in (("rules", parse_robots(RULES_TEXT)), ("allow", RobotsPolicy(ALLOW_ALL, "404", status=404)),
                         ("down", RobotsPolicy(DISALLOW_ALL, "503", status=503)), ("nodns", None)):
        assert store.claim(host, "round-0", now=now) is True
        store.put(host, "round-0", policy, fetched_at=now, text=RULES_TEXT)
    same = {h: store.claim(h, "round-0", now=now + 1) for h in ("rules", "allow", "down", "nodns")}
    assert all(isinstance(v, Decision) for v in same.values())
    assert same["down"].policy.kind == DISALLOW_ALL and same["nodns"].policy is None
    later = {h: store.claim(h, "round-1", now=now + 2) for h in ("rules", "allow", "down", "nodns")}
    assert isinstance(later["rules"], Decision) and isinstance(later["allow"], Decision)
    assert later["down"] is True and later["nodns"] is True  # asked again in the next round


def test_decisions_expire_after_a_day_and_claims_after_their_limit(tmp_path):
    store = RobotsStore(str(tmp_path / "r.sqlite"), claim_seconds=10)
    now = time.time()
    store.claim("h", "s", now=now)
    store.put("h", "s", RobotsPolicy(ALLOW_ALL), fetched_at=now)
    assert isinstance(store.claim("h", "s", now=now + 23 * 3600), Decision)
    assert store.claim("h", "s", now=now + 25 * 3600) is True  # RFC 9309: no cached copy older than 24 h
    assert store.claim("k", "s", now=now) is True
    assert store.claim("k", "s", now=now + 5) is False
    assert store.claim("k", "s", now=now + 11) is True  # the claimant died: the claim lapses


def test_a_prefetched_request_is_counted_once(tmp_path):
    store = RobotsStore(str(tmp_path / "r.sqlite"))
    store.claim("h", "s")
    store.put("h", "s", RobotsPolicy(ALLOW_ALL), fetched_at=time.time(), seconds=0.25, uncounted=True)
    assert store.take_uncounted("h") == pytest.approx(0.25)
    assert store.take_uncounted("h") is None


def test_a_store_that_cannot_be_opened_lets_each_process_decide(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    store = RobotsStore(str(tmp_path / "file" / "r.sqlite"))
    assert store.claim("h", "s") is True and store.claim("h", "s") is True
    store.put("h", "s", RobotsPolicy(ALLOW_ALL), fetched_at=time.time())
    assert store.broken and "switched off" in capsys.readouterr().out


def _race(path: str, hosts: list[str], out: str) -> None:
    store = RobotsStore(path, claim_seconds=30)
    fetched, decided = [], 0
    for h in hosts:
        got = store.wait(h, "s")
        if got is True:
            fetched.append(h)
            time.sleep(0.002)  # the request
            store.put(h, "s", RobotsPolicy(ALLOW_ALL), fetched_at=time.time())
        else:
            decided += 1
    with open(out, "w") as f:
        f.write("\n".join([str(decided)] + fetched))


def test_processes_racing_for_the_same_hosts_fetch_each_host_once(tmp_path):
    hosts = [f"http://127.0.0.{i}:{p}" for i in range(10, 20) for p in range(20)]
    path = str(tmp_path / "r.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for k in range(3):  # each walks the hosts from another starting point
        order = hosts[k * 50:] + hosts[:k * 50]
        procs.append(ctx.Process(target=_race, args=(path, order, str(tmp_path / f"out{k}"))))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    fetched, decided = [], 0
    for k in range(3):
        lines = (tmp_path / f"out{k}").read_text().split("\n")
        decided += int(lines[0])
        fetched += [x for x in lines[1:] if x]
    assert sorted(fetched) == sorted(hosts)  # every host fetched by exactly one process
    assert decided == 2 * len(hosts)  # and read from the store by the two others


# ---------------------------------------------------------------------------------- crawls against real servers

RULES, NO_ROBOTS, ROBOTS_DOWN, RETRIED = "127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13"
SPECS = {RULES: HostSpec(robots=RULES_TEXT), ROBOTS_DOWN: HostSpec(robots="oops", robots_status=503),
         RETRIED: HostSpec(robots="User-agent: *\nAllow: /\n")}
RPS = 4.0


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [8, 0], ids=["prefetch", "no-prefetch"])
def test_two_processes_and_two_rounds_ask_each_host_for_robots_txt_once(tmp_path, prefetch):
    with HostileWeb((RULES, NO_ROBOTS, ROBOTS_DOWN, RETRIED), SPECS) as web:
        urls = [web.url(h, f"/ok/{h[-2:]}-{i}.jpg") for h in (RULES, NO_ROBOTS, ROBOTS_DOWN, RETRIED)
                for i in range(12)]
        urls += [web.url(RULES, f"/private/{i}.jpg") for i in range(3)]
        urls += [web.url(RETRIED, f"/status/503/{i}.jpg") for i in range(2)]  # retried in round 1
        write_candidates(urls, tmp_path / "candidates.parquet")
        config = CrawlConfig(allow_cidrs=("127.0.0.8/29",), processes=2, thread_count=4, number_sample_per_shard=10,
                             image_size=64, per_host_connections=2, per_host_rps=RPS, retries=0, recrawl_rounds=1,
                             robots_timeout=2.0, timeout=5, max_download_seconds=5, image_processes=0,
                             robots_prefetch_threads=prefetch, staging_dir=str(tmp_path / "staging"))
        out = str(tmp_path / "crawl")
        log = tmp_path / "crawl.log"
        crawl_all(tmp_path / "candidates.parquet", out, config, log_file=str(log))
        records = {h: sorted(web.records(h), key=lambda r: r.start) for h in web.hosts}

    robots = {h: sum(r.path == "/robots.txt" for r in recs) for h, recs in records.items()}
    # Once per host for both processes and both rounds; the host whose robots.txt was down is asked again in
    # round 1 (that is why its URLs are retryable), and nothing else of it is requested.
    assert robots == {RULES: 1, NO_ROBOTS: 1, ROBOTS_DOWN: 2, RETRIED: 1}, robots
    assert {r.path for r in records[ROBOTS_DOWN]} == {"/robots.txt"}
    assert not [r.path for r in records[RULES] if r.path.startswith("/private/")]
    assert sum(r.path.startswith("/status/503/") for r in records[RETRIED]) == 4  # two rounds x two URLs
    # The per-host report counts every request the servers received, whoever made it (prefetch or worker).
    report = host_report(out, top=10)["hosts"]
    for h, recs in records.items():
        assert report[f"http://{h}:{web.ports[h]}"]["requests"] == len(recs), h
    # The first image request to a host keeps the rate after its robots.txt request (one process's share: a
    # token every processes / rps seconds), even when another process or the prefetch made that request.
    gap = 1.0 / (RPS / config.processes)
    for h in (RULES, NO_ROBOTS, RETRIED):
        first_robots = next(r.start for r in records[h] if r.path == "/robots.txt")
        first_image = next(r.start for r in records[h] if r.path != "/robots.txt")
        assert first_image - first_robots >= gap - 0.05, (h, first_image - first_robots)
    text = log.read_text()
    if prefetch:
        assert "robots.txt prefetched for" in text
    else:
        assert "prefetched" not in text
    assert not list((tmp_path / "staging").glob("*/robots.sqlite*"))  # removed once every round is finished
