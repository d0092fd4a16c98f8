"""The images stage reads the hashes the crawl computed instead of reading and decoding every image again, and
its pool is byte-identical to the one it makes by decoding the published images itself."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.crawl import CrawlConfig, crawl_all, crawl_shard_files
from pipelines.images import crawl_reader
from pipelines.images.crawl_reader import HASH_COLUMNS
from pipelines.images.stage import ImagesConfig, process_images
from pipelines.synthweb.hostile import HostileWeb

pytestmark = pytest.mark.slow

HOSTS = ("127.0.0.10", "127.0.0.11", "127.0.0.12")
CONFIG = CrawlConfig(allow_cidrs=("127.0.0.8/29",), timeout=3, max_download_seconds=3, retries=0, thread_count=8,
                     number_sample_per_shard=20, image_size=64, per_host_rps=None, recrawl_rounds=0)


@pytest.fixture(scope="module")
def crawl_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crawlimg")
    with HostileWeb(HOSTS) as web:
        urls = [web.url(HOSTS[i % 3], f"/ok/i{i}.jpg") for i in range(24)]
        urls += [web.url(HOSTS[i % 3], f"/big/n{i}.jpg") for i in range(6)]
        urls += [web.url(HOSTS[1], "/ok/i3.jpg"), web.url(HOSTS[2], "/ok/i3.jpg")]  # the same bytes elsewhere
        urls += [web.url(HOSTS[0], "/status/500/x.jpg"), web.url(HOSTS[2], "/status/404/y.jpg")]
        rows = [{"uid": hashlib.sha256(u.encode()).hexdigest()[:32], "url": u, "caption": f"picture {i}",
                 "entry_ids": [i % 4, 7], "lang": "en", "lang_score": 1.0, "keep_prob": 1.0}
                for i, u in enumerate(urls)]
        schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                            ("entry_ids", pa.list_(pa.int32())), ("lang", pa.string()),
                            ("lang_score", pa.float32()), ("keep_prob", pa.float64())])
        pq.write_table(pa.Table.from_pylist(rows, schema), tmp / "candidates.parquet")
        crawl_all(tmp / "candidates.parquet", tmp / "crawl", CONFIG.replace(staging_dir=str(tmp / "staging")))
    return tmp


def _pool_bytes(pool_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(pool_dir.glob("samples-*.parquet"))}


def test_pool_is_identical_without_reading_the_tars(crawl_dir, monkeypatch, tmp_path):
    cfg = ImagesConfig(min_side=32, max_aspect=3.0, near_dup_radius=4)

    def no_tar_reads(*_a, **_k):
        raise AssertionError("the images stage read a crawl tar although the crawl computed the hashes")

    with monkeypatch.context() as m:
        m.setattr(crawl_reader, "_tar_images", no_tar_reads)
        fast = process_images(str(crawl_dir / "crawl"), str(tmp_path / "pool-fast"), cfg,
                              rejected_uri=str(tmp_path / "rej-fast.parquet"))
    # The same crawl without the crawl's columns: the stage reads every tar and decodes every image.
    for _r, pq_uri, _t in crawl_shard_files(str(crawl_dir / "crawl")):
        t = pq.read_table(pq_uri)
        pq.write_table(t.drop_columns([c for c in HASH_COLUMNS if c in t.column_names]), pq_uri)
    slow = process_images(str(crawl_dir / "crawl"), str(tmp_path / "pool-slow"), cfg,
                          rejected_uri=str(tmp_path / "rej-slow.parquet"))
    assert fast.kept == slow.kept >= 28 and fast.rejected == slow.rejected
    assert fast.rejected.get("dedup:exact_duplicate") == 2, fast.rejected
    assert _pool_bytes(tmp_path / "pool-fast") == _pool_bytes(tmp_path / "pool-slow")
    assert (tmp_path / "rej-fast.parquet").read_bytes() == (tmp_path / "rej-slow.parquet").read_bytes()


def test_helpers_and_download_threads_publish_the_same_shards(tmp_path):
    """image_processes 0 (the download threads resize and hash), 2 private helpers per crawl process and the round's
    shared helpers (the default) give the same tars and the same Parquet rows, timings aside; the shards' stats say
    which did the work."""
    from pipelines.crawl import host_report

    runs = {"threads": dict(image_processes=0), "private": dict(image_processes=2, shared_image_helpers=False),
            "shared": dict(image_processes=2)}
    with HostileWeb(HOSTS) as web:
        urls = [web.url(HOSTS[i % 3], f"/ok/h{i}.jpg") for i in range(30)]
        urls += [web.url(HOSTS[0], "/big/h.jpg"), web.url(HOSTS[1], "/status/500/z.jpg")]
        rows = [{"uid": hashlib.sha256(u.encode()).hexdigest()[:32], "url": u, "caption": f"p {i}",
                 "entry_ids": [i % 4], "lang": "en", "lang_score": 1.0, "keep_prob": 1.0} for i, u in enumerate(urls)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "candidates.parquet")
        out, report = {}, {}
        for name, knobs in runs.items():
            crawl_all(tmp_path / "candidates.parquet", tmp_path / name,
                      CONFIG.replace(staging_dir=str(tmp_path / f"staging-{name}"), **knobs))
            out[name] = crawl_shard_files(str(tmp_path / name))
            report[name] = host_report(str(tmp_path / name))["rounds"][0]
    assert len(out["threads"]) >= 2
    ok = 0
    for name in ("private", "shared"):
        assert len(out[name]) == len(out["threads"])
        for (_r0, pq0, tar0), (_r2, pq2, tar2) in zip(out["threads"], out[name]):
            with open(tar0, "rb") as a, open(tar2, "rb") as b:
                assert a.read() == b.read()
            t0, t2 = (pq.read_table(p).drop_columns(["fetch_seconds"]) for p in (pq0, pq2))
            assert t0.to_pylist() == t2.to_pylist()
            ok += sum(1 for s in t0.column("status").to_pylist() if s == "success")
    assert ok >= 60
    assert report["threads"]["helper_cpu_s"] == report["threads"]["shared_helper_cpu_s"] == 0
    # (private helpers start with the crawl process's first shard: on 32 URLs the threads may finish before)
    assert report["private"]["shared_helper_cpu_s"] == 0
    # The round's helpers did the work (started before the first download, so none was done in the threads).
    assert report["shared"]["shared_helper_cpu_s"] > 0 and report["shared"]["helper_cpu_s"] == 0
    assert report["shared"]["processed_in_thread"] == 0


def test_a_round_whose_shared_helpers_cannot_start_uses_private_ones(tmp_path, monkeypatch):
    """A temporary directory whose path is too long for a Unix socket: the round cannot start its shared helpers,
    says so in the crawl log, and each crawl process starts its own; every image is still published."""
    import tempfile

    from pipelines.crawl import host_report

    long_tmp = tmp_path / ("t" * 60) / ("u" * 60)
    long_tmp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with HostileWeb(HOSTS) as web:
        urls = [web.url(HOSTS[i % 3], f"/ok/f{i}.jpg") for i in range(40)]
        rows = [{"uid": hashlib.sha256(u.encode()).hexdigest()[:32], "url": u, "caption": f"f {i}",
                 "entry_ids": [0], "lang": "en", "lang_score": 1.0, "keep_prob": 1.0} for i, u in enumerate(urls)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "candidates.parquet")
        log = tmp_path / "crawl.log"
        crawl_all(tmp_path / "candidates.parquet", tmp_path / "crawl",
                  CONFIG.replace(staging_dir=str(tmp_path / "staging"), image_processes=1), log_file=str(log))
    report = host_report(str(tmp_path / "crawl"))["rounds"][0]
    assert report["successes"] == 40
    assert "could not start the shared image helpers" in log.read_text()
    assert report["shared_helper_cpu_s"] == 0
    assert not list(long_tmp.glob("clipline-helpers-*"))  # nothing of ours left behind (wandb leaves its own)
