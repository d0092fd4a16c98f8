"""A crawl whose directory is on S3 (moto's server on 127.0.0.1): shards are staged locally and published through
pipelines.core.storage (tar, Parquet, stats last); resume reads the published shards; nothing of img2dataset's
chatter reaches the terminal."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core import storage
from pipelines.crawl import CrawlConfig, CrawlStage, crawl_outcome, list_rounds
from pipelines.synthweb.hostile import HostileWeb

pytestmark = pytest.mark.slow

HOSTS = ("127.0.0.10", "127.0.0.11")
CONFIG = CrawlConfig(allow_cidrs=("127.0.0.8/29",), timeout=3, max_download_seconds=3, retries=0, thread_count=8,
                     number_sample_per_shard=10, image_size=64, per_host_rps=None, recrawl_rounds=1)


def _candidates(urls: list[str]) -> pa.Table:
    rows = [{"uid": hashlib.sha256(u.encode()).hexdigest()[:32], "url": u, "caption": f"picture {i}",
             "entry_ids": [i % 3], "lang": "en", "lang_score": 1.0, "keep_prob": 1.0} for i, u in enumerate(urls)]
    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                        ("entry_ids", pa.list_(pa.int32())), ("lang", pa.string()), ("lang_score", pa.float32()),
                        ("keep_prob", pa.float64())])
    return pa.Table.from_pylist(rows, schema)


@pytest.mark.parametrize("part_rows", [None, 10], ids=["whole-list", "list-in-parts"])
def test_crawl_to_s3_publishes_and_resumes(s3_bucket, tmp_path, capfd, part_rows):
    config = CONFIG if part_rows is None else CONFIG.replace(url_list_part_rows=part_rows)
    with HostileWeb(HOSTS) as web:
        urls = [web.url(HOSTS[i % 2], f"/ok/s3-{i}.jpg") for i in range(25)] + [web.url(HOSTS[0], "/status/404/x.jpg")]
        cand = f"{s3_bucket}/curate/candidates/part-0.parquet"
        storage.write_table(cand, _candidates(urls))
        out = f"{s3_bucket}/build/crawl"
        log = tmp_path / "crawl.log"
        stage = CrawlStage(config.replace(staging_dir=str(tmp_path / "staging")),
                           {"candidates": f"{s3_bucket}/curate/candidates"}, out,
                           rejected=f"{s3_bucket}/build/rejected/crawl.parquet", log_file=str(log))
        result = stage.run()
        captured = capfd.readouterr()
        assert result.input_rows == 26 and result.kept == 25 and result.rejected == {"http_404": 1}
        listing = storage.list_prefix(out)
        for i in range(3):
            for suffix in (".tar", ".parquet", "_stats.json"):
                assert f"{out}/{i:05d}{suffix}" in listing
        assert all(u.startswith(out) for u in result.outputs["shards"])
        assert not list((tmp_path / "staging").rglob("*.tar"))  # staging emptied after publishing
        # img2dataset's lines went to the log file, none to the terminal
        assert "Downloading starting now" in log.read_text()
        assert "Downloading starting now" not in captured.out + captured.err
        assert "it/s" not in captured.out + captured.err
        outcome = crawl_outcome(out)
        assert outcome.successes.num_rows == 25
        images = list(outcome.iter_images())  # ranged reads of the published tars on S3
        assert all(hashlib.sha256(data).hexdigest() == row["img_sha256"] for row, data in images)
        rej = storage.read_table(f"{s3_bucket}/build/rejected/crawl.parquet").to_pylist()
        assert [(r["url"], r["reason"], r["stage"]) for r in rej] == [(urls[-1], "http_404", "crawl")]

        # A shard whose stats file is gone was not finished: the rerun fetches exactly its URLs again.
        storage.delete(f"{out}/00001_stats.json")
        assert [r.done_shards for r in list_rounds(out)][0] == (0, 2)
        shard1 = set(storage.read_table(f"{out}/00001.parquet").column("url").to_pylist())
        web.reset()
        again = CrawlStage(config.replace(staging_dir=str(tmp_path / "staging")),
                           {"candidates": f"{s3_bucket}/curate/candidates"}, out,
                           rejected=f"{s3_bucket}/build/rejected/crawl.parquet", log_file=str(log)).run()
        fetched = {web.url(r.host, r.path) for r in web.records() if r.path != "/robots.txt"}
        assert fetched == shard1 and not again.reused
        assert again.kept == 25


def test_candidates_errors_name_the_file(s3_bucket, tmp_path):
    from pipelines.crawl import CrawlError, read_candidates

    with pytest.raises(CrawlError, match="holds no"):
        read_candidates(f"{s3_bucket}/empty")
    storage.write_bytes_atomic(f"{s3_bucket}/bad/part-0.parquet", b"\x00\x01not parquet at all")
    with pytest.raises(CrawlError, match=r"bad/part-0\.parquet: not a readable Parquet file"):
        read_candidates(f"{s3_bucket}/bad")
    local = tmp_path / "c.parquet"
    pq.write_table(_candidates(["http://127.0.0.10/a.jpg"]).drop(["uid"]), local)
    with pytest.raises(CrawlError, match=r"c\.parquet.*uid"):
        read_candidates(str(local))
