"""A round's URL list: uid order with each host's URLs spread over it; a list written in uid order by an earlier
version is resumed as it is."""
from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.core import storage
from pipelines.crawl import CrawlConfig, CrawlError
from pipelines.crawl.driver import _prepare_round, _url_list
from pipelines.crawl.rounds import meta_uri


def _candidates() -> pa.Table:
    urls = [f"http://big/{i}.jpg" for i in range(40)] + [f"http://h{i}/x.jpg" for i in range(40)]
    uids = [f"{i:04d}" for i in range(len(urls))]
    return pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))], "uid": uids})


def test_url_list_spreads_a_host_over_the_list():
    cand = _candidates()
    listed = _url_list(cand)
    assert sorted(listed.column("uid").to_pylist()) == cand.column("uid").to_pylist()
    urls = listed.column("url").to_pylist()
    # half the URLs are big's: each quarter of the list holds about 10 of them (uid order: 20, 20, 0, 0)
    for part in range(4):
        assert 8 <= sum(u.startswith("http://big/") for u in urls[20 * part:20 * part + 20]) <= 12, urls
    assert [u for u in urls if u.startswith("http://big/")] == [f"http://big/{i}.jpg" for i in range(40)]


def test_a_round_started_in_uid_order_resumes_as_it_is(tmp_path):
    crawl_dir, config = str(tmp_path / "crawl"), CrawlConfig()
    cand = _candidates()
    old = cand.select(["url", "caption", "uid"])  # what an earlier version wrote: uid order
    storage.write_table(meta_uri(crawl_dir, 0, "input.parquet"), old)
    storage.write_json(meta_uri(crawl_dir, 0, "config.json"), config.to_dict())
    uri = _prepare_round(crawl_dir, 0, _url_list(cand), config)
    assert storage.read_table(uri).equals(old)  # kept: its finished shards refer to its order
    changed = cand.set_column(1, "caption", pa.array(["other"] * cand.num_rows))
    with pytest.raises(CrawlError, match="different URL list"):
        _prepare_round(crawl_dir, 0, _url_list(changed), config)
