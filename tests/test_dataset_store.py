"""The crawl store (pipelines.dataset.crawl_store): lookups by URL hash, back-off by reason on the ``as_of`` clock,
takedown deletion of stored bytes, and what a killed write leaves. No network, no build: fast."""
import hashlib
import os

import pytest

from pipelines.dataset.crawl_store import (DAY, DUE, HIT, NEW, REUSE_FAILED, BackoffPolicy, CrawlStore, FetchResult,
                                           StoreError, format_time, parse_time, url_hash)

T0 = "2025-03-01T00:00:00Z"


def ok(url, data=None):
    data = data or hashlib.sha256(url.encode()).digest() * 40
    return FetchResult(url=url, status="ok", data=data, meta={"img_width": 8, "img_height": 8, "phash": 1,
                                                              "dhash": 2, "width": 8, "height": 8})


def failed(url, reason):
    return FetchResult(url=url, status="failed", reason=reason, error_message=f"clipline:{reason}: test")


def at(days: float) -> int:
    return parse_time(T0) + int(days * DAY)


def test_record_then_plan_reuses_successes_and_waits_by_reason(tmp_path):
    store = CrawlStore.open(str(tmp_path / "store"))
    urls = {"ok": "http://a.test/1.jpg", "404": "http://a.test/2.jpg", "timeout": "http://b.test/3.jpg",
            "opt": "http://b.test/4.jpg", "5xx": "http://b.test/5.jpg"}
    store.record([ok(urls["ok"]), failed(urls["404"], "http_404"), failed(urls["timeout"], "timeout_headers"),
                  failed(urls["opt"], "opt_out"), failed(urls["5xx"], "http_5xx")], T0, layout="L1")
    new = "http://c.test/new.jpg"
    everything = list(urls.values()) + [new, urls["ok"]]  # duplicates are planned once

    plan = store.plan(everything, at(0.5), layout="L1")  # half a day later: nothing is due
    assert set(plan.ok) == {urls["ok"]} and plan.fetch == [new] and plan.due == []
    assert set(plan.failed) == {urls["404"], urls["timeout"], urls["opt"], urls["5xx"]}

    plan = store.plan(everything, at(1.01), layout="L1")  # transient reasons (1 day) are due, 404/opt-out not
    assert plan.due == sorted([urls["timeout"], urls["5xx"]])
    assert sorted(plan.fetch) == sorted([new, urls["timeout"], urls["5xx"]])
    assert store.due(at(1.01)) == sorted([urls["timeout"], urls["5xx"]])
    assert store.due(at(1.01), urls=[urls["timeout"]]) == [urls["timeout"]]

    plan = store.plan(everything, at(30.01), layout="L1")  # permanent reasons wait 30 days
    assert set(plan.due) == {urls["404"], urls["timeout"], urls["opt"], urls["5xx"]}
    # other image settings: the stored success is downloaded again
    assert store.plan([urls["ok"]], at(0.5), layout="L2").fetch == [urls["ok"]]
    # the stored bytes come back whole and checked
    entry = store.get(urls["ok"])
    assert store.read_image(entry) == ok(urls["ok"]).data
    assert store.state(entry, at(1000), "L1") == HIT


def test_consecutive_failures_back_off_longer_and_a_success_resets(tmp_path):
    policy = BackoffPolicy(transient_days=1, factor=2, max_days=5, by_reason={"http_429": 0.25})
    store = CrawlStore.open(str(tmp_path / "s"), policy)
    u = "http://x.test/a.jpg"
    store.record([failed(u, "timeout")], at(0))
    assert store.get(u)["next_retry"] == at(1)
    store.record([failed(u, "timeout")], at(1))
    assert store.get(u)["next_retry"] == at(1 + 2)
    store.record([failed(u, "timeout")], at(3))
    assert store.get(u)["next_retry"] == at(3 + 4)
    store.record([failed(u, "timeout")], at(7))
    assert store.get(u)["next_retry"] == at(7 + 5)  # capped at max_days
    assert store.get(u)["attempts"] == 4 and store.get(u)["failures"] == 4
    store.record([ok(u)], at(12))
    assert store.get(u)["failures"] == 0 and store.state(store.get(u), at(12)) == HIT
    assert policy.wait_seconds("http_429") == int(0.25 * DAY)
    assert policy.wait_seconds("http_404") == 30 * DAY and policy.wait_seconds("other:weird") == 30 * DAY
    # a fresh store object reads the same records (segments on disk)
    assert CrawlStore.open(str(tmp_path / "s"), policy).get(u)["status"] == "ok"
    assert [store.state(None, 0), store.state(store.get(u), 0)] == [NEW, HIT]
    store.record([failed("http://x.test/b.jpg", "http_404")], at(12))
    assert store.state(store.get("http://x.test/b.jpg"), at(13)) == REUSE_FAILED
    assert store.state(store.get("http://x.test/b.jpg"), at(43)) == DUE


def test_delete_removes_the_bytes_from_every_pack_and_keeps_the_rest(tmp_path):
    root = tmp_path / "s"
    store = CrawlStore.open(str(root))
    a, b, c = (f"http://h.test/{i}.jpg" for i in "abc")
    store.record([ok(a, b"A" * 3000), ok(b, b"B" * 3000)], T0)
    store.record([ok(c, b"C" * 3000)], T0)
    assert store.delete([a, "http://never.test/x.jpg"]) == [a]
    packs = [p for p in (root / "packs").iterdir()]
    blob = b"".join(p.read_bytes() for p in packs)
    assert b"A" * 3000 not in blob  # gone from disk, not only from the index
    assert b"B" * 3000 in blob and b"C" * 3000 in blob
    assert store.read_image(store.get(b)) == b"B" * 3000 and store.read_image(store.get(c)) == b"C" * 3000
    assert store.get(a)["status"] == "deleted" and store.plan([a], T0).fetch == [a]
    with pytest.raises(StoreError):
        store.read_image(store.get(a))
    assert store.delete([a]) == []  # idempotent
    store.compact()
    assert len(list((root / "index").iterdir())) == 1 and store.get(b)["status"] == "ok"


def test_a_killed_write_leaves_an_unreferenced_pack_that_gc_removes(tmp_path):
    root = tmp_path / "s"
    store = CrawlStore.open(str(root))
    store.record([ok("http://h.test/1.jpg")], T0)
    orphan = root / "packs" / "00000099.tar"
    orphan.write_bytes(b"bytes of a pack whose index segment was never written")
    assert store.get("http://h.test/1.jpg")["pack"] != "packs/00000099.tar"
    assert store.gc() == [str(orphan)] and not orphan.exists()
    assert store.read_image(store.get("http://h.test/1.jpg"))


def test_times_and_errors():
    assert parse_time("2025-03-01") == parse_time("2025-03-01T00:00:00Z") == parse_time("2025-03-01T01:00:00+01:00")
    assert format_time(parse_time("2025-03-01T12:30:00Z")) == "2025-03-01T12:30:00Z"
    assert parse_time(1740787200) == 1740787200
    with pytest.raises(StoreError, match="not a time"):
        parse_time("yesterday")
    assert len(url_hash("http://a")) == 64
    with pytest.raises(Exception, match="backoff.factor"):
        BackoffPolicy(factor=0.5)


def test_not_a_store(tmp_path):
    (tmp_path / "STORE.json").write_text('{"format": "something else"}')
    with pytest.raises(StoreError, match="not a clipline crawl store"):
        CrawlStore.open(str(tmp_path))
    with pytest.raises(StoreError, match="no crawl store"):
        CrawlStore.open(str(tmp_path / "absent"), create=False)
    assert not os.path.exists(tmp_path / "absent")


def test_lookup_is_row_for_row_and_the_cached_index_follows_every_write(tmp_path):
    """The column-wise index: lookups align with the asked hashes (repeats, unknowns), and the index a store keeps
    current through record/delete/compact equals the one a fresh reader gets from the files."""
    import pyarrow as pa

    from pipelines.dataset.crawl_store import hash_urls

    path = str(tmp_path / "store")
    store = CrawlStore.open(path)
    a, b, c, d = (f"http://h.test/{k}.jpg" for k in "abcd")
    store.index_table()  # cached from here on
    store.record([ok(a), failed(b, "timeout"), ok(c)], T0)
    store.record([failed(a, "http_404"), ok(b)], at(2))  # the newest record of a URL wins
    store.delete([c])
    store.record([failed(d, "http_5xx")], at(3))

    def rows(s):
        return sorted(s.index_table().to_pylist(), key=lambda r: r["url_hash"])

    assert rows(store) == rows(CrawlStore.open(path)) and len(rows(store)) == 4
    got = store.lookup(hash_urls(pa.array([d, "http://nowhere.test/x", a, d]))).to_pylist()
    assert [r["url"] for r in got] == [d, None, a, d]
    assert [r["status"] for r in got] == ["failed", None, "failed", "failed"]
    assert got[2]["attempts"] == 2 and got[2]["reason"] == "http_404" and store.get(b)["status"] == "ok"
    assert store.get(c)["status"] == "deleted" and store.get("http://nowhere.test/x") is None
    assert hash_urls(pa.array([a, a])).to_pylist() == [url_hash(a)] * 2
    store.compact()
    assert rows(store) == rows(CrawlStore.open(path)) and len(list((tmp_path / "store/index").iterdir())) == 1
    plan = store.plan([a, b, c, d, a], at(3), layout=None)
    assert plan.counts() == {"reused_ok": 1, "reused_failed": 2, "fetch": 1, "due_retry": 0, "new": 1}
    assert plan.fetch == [c] and set(plan.ok) == {b} and set(plan.failed) == {a, d}
