"""The crawl on Spark: img2dataset's ``pyspark`` distributor running clipline's CrawlDownloader (SSRF guard, limits,
hashes, publishing) in the executors of a real Spark standalone cluster on 127.0.0.1 (master + 2 workers, see
tests/spark_fixtures.py), against the session's synthetic web. The same candidates crawled with the
``multiprocessing`` distributor give the same successful uids and the same image bytes; the redirect to 127.0.0.2
and a direct fetch of 127.0.0.2 are blocked inside the executors."""
from __future__ import annotations

import hashlib
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.crawl import CrawlConfig, crawl, crawl_outcome
from tests.conftest import SINGLE_HOST_WEB
from tests.spark_fixtures import spark_session  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

BASE = dict(allow_cidrs=("127.0.0.1/32",), retries=0, timeout=4, max_download_seconds=4, processes=2,
            thread_count=8, number_sample_per_shard=40, image_size=64, **SINGLE_HOST_WEB)


def _uid(url: str, caption: str) -> str:
    return hashlib.sha256(f"{url}\x00{caption}".encode()).hexdigest()[:32]


@pytest.fixture(scope="module")
def small_web(tmp_path_factory):
    """A small synthetic web (every failure mode) on 127.0.0.1, with its private listener on 127.0.0.2. Built
    here rather than taken from conftest's synth_web_small: that one also builds a query list the crawl does not
    need, and its flaky routes stay healed for the session once another test has crawled them."""
    from pipelines.synthweb import SynthWebServer, generate_web

    root = tmp_path_factory.mktemp("sparkweb")
    generate_web(root / "web", 120, seed=7, n_kinds=3, n_colours=2, heldout_per_class=1)
    with SynthWebServer(root / "web") as server:
        yield {"root": root / "web", "pairs": server.materialise_url_list()["parquet"], "server": server}


def _heal_reset(server) -> None:
    """Each crawl meets the flaky routes as a fresh web would (their first request fails with a 503)."""
    with server._lock:
        server._flaky.clear()


def _write_candidates(web, out: Path) -> dict[str, dict]:
    """Every pair of the synthetic web is a candidate, plus one URL straight at the private listener (127.0.0.2)."""
    server = web["server"]
    rows = {}
    for r in pq.read_table(web["pairs"]).to_pylist():
        assert r["url"].startswith(server.base_url)
        uid = _uid(r["url"], r["caption"])
        rows[uid] = {"uid": uid, "url": r["url"], "caption": r["caption"], "entry_ids": [1], "lang": r["lang"],
                     "lang_score": 0.9, "keep_prob": 0.5, "mode": r["failure_mode"]}
    direct = f"http://127.0.0.2:{server.private_port}/latest/meta-data/direct.jpg"
    uid = _uid(direct, "direct private fetch")
    rows[uid] = {"uid": uid, "url": direct, "caption": "direct private fetch", "entry_ids": [1], "lang": "en",
                 "lang_score": 0.9, "keep_prob": 0.5, "mode": "direct_private"}
    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                        ("entry_ids", pa.list_(pa.int32())), ("lang", pa.string()), ("lang_score", pa.float32()),
                        ("keep_prob", pa.float64())])
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows.values()], schema), out)
    return rows


def _image_digests(crawl_dir: Path) -> dict[str, str]:
    """uid -> sha256 of the image member in the crawl's tar (read from the tar, not from the Parquet)."""
    outcome = crawl_outcome(str(crawl_dir))
    members: dict[str, dict[str, bytes]] = {}
    digests = {}
    for s in outcome.successes.to_pylist():
        if s["tar"] not in members:
            with tarfile.open(crawl_dir / s["tar"]) as tf:
                members[s["tar"]] = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        data = members[s["tar"]][s["member"]]
        digests[s["uid"]] = hashlib.sha256(data).hexdigest()
        assert digests[s["uid"]] == s["img_sha256"]
    return digests


def test_pyspark_distributor_matches_multiprocessing_and_keeps_the_guard(spark_session, small_web,  # noqa: F811
                                                                          tmp_path):
    spark, cluster = spark_session
    web, server = small_web, small_web["server"]
    rows = _write_candidates(web, tmp_path / "candidates.parquet")
    private_before = sum(server.private_hits.values())

    _heal_reset(server)
    t0 = time.monotonic()
    mp_info = crawl(tmp_path / "candidates.parquet", tmp_path / "crawl-mp",
                    CrawlConfig(distributor="multiprocessing", staging_dir=str(tmp_path / "stage-mp"), **BASE),
                    log_file=str(tmp_path / "mp.log"))
    t_mp = time.monotonic() - t0

    # The pyspark crawl runs in another thread than the one that built the session (as a Prefect task would):
    # the engine makes the existing session active there, so img2dataset neither builds nor stops its own.
    driver_app = spark.sparkContext.applicationId
    _heal_reset(server)
    result: dict = {}

    def spark_crawl():
        try:
            result["info"] = crawl(tmp_path / "candidates.parquet", tmp_path / "crawl-spark",
                                   CrawlConfig(distributor="pyspark", staging_dir=str(tmp_path / "stage-spark"),
                                               **BASE), log_file=str(tmp_path / "spark.log"))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            result["error"] = err

    t0 = time.monotonic()
    th = threading.Thread(target=spark_crawl)
    th.start()
    th.join()
    if "error" in result:
        raise result["error"]
    sp_info = result["info"]
    t_spark = time.monotonic() - t0
    print(f"spark mode={cluster.mode} master={cluster.master_url} app={driver_app}: "
          f"multiprocessing {t_mp:.1f}s, pyspark {t_spark:.1f}s")

    # img2dataset used the session we made (it did not create and stop its own local one).
    assert spark.sparkContext._jsc is not None  # not stopped
    assert spark.sparkContext.master == cluster.master_url and spark.sparkContext.applicationId == driver_app
    assert mp_info.complete and sp_info.complete and mp_info.n_shards == sp_info.n_shards >= 4

    mp, sp = crawl_outcome(str(tmp_path / "crawl-mp")), crawl_outcome(str(tmp_path / "crawl-spark"))
    assert mp.n_candidates == sp.n_candidates == len(rows)
    mp_digests, sp_digests = _image_digests(tmp_path / "crawl-mp"), _image_digests(tmp_path / "crawl-spark")
    assert len(mp_digests) >= 50
    assert set(sp_digests) == set(mp_digests), {u: rows[u]["mode"] for u in set(sp_digests) ^ set(mp_digests)}
    assert sp_digests == mp_digests  # and the same image bytes
    assert {r["uid"]: r["reason"] for r in sp.failures.to_pylist()} == \
        {r["uid"]: r["reason"] for r in mp.failures.to_pylist()}

    # The SSRF guard ran in the executors: the redirect to 127.0.0.2 and the direct fetch of it are blocked,
    # and the private listener was never reached.
    reasons = {r["uid"]: r["reason"] for r in sp.failures.to_pylist()}
    private = [u for u, r in rows.items() if r["mode"] in ("redirect_private", "direct_private")]
    assert any(rows[u]["mode"] == "redirect_private" for u in private)
    assert all(reasons.get(u) == "blocked_private_address" for u in private), \
        {rows[u]["mode"]: reasons.get(u) for u in private}
    assert sum(server.private_hits.values()) == private_before == 0
