"""Round URL lists built in parts (pipelines.crawl.url_lists): the same rows as the whole-list build, in uid order
across parts, each host spread within its part, duplicate uids and bad files refused with their file named; a crawl
whose list is built and read in parts publishes what the whole-list crawl publishes, and resumes only with the same
list."""
from __future__ import annotations

import bisect
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core import storage
from pipelines.crawl import CrawlConfig, CrawlError, crawl_all, crawl_outcome, crawl_shard_files, url_lists
from pipelines.crawl.driver import CARRIED_COLUMNS, _url_list, read_candidates
from pipelines.crawl.rounds import meta_uri
from pipelines.synthweb.hostile import HostileWeb

COLUMNS = ["url", "caption", *CARRIED_COLUMNS]
SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                    ("entry_ids", pa.list_(pa.int32())), ("lang", pa.string()), ("lang_score", pa.float32()),
                    ("keep_prob", pa.float64())])


def _rows(n: int, seed: int = 0, hosts: int = 30) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h = int(rng.zipf(1.6)) % hosts  # a few hosts hold most URLs
        url = f"http://h{h}.example/{seed}/{i}.jpg"
        out.append({"uid": hashlib.sha256(url.encode()).hexdigest()[:32], "url": url, "caption": f"c {i}",
                    "entry_ids": [i % 5], "lang": "en", "lang_score": 1.0, "keep_prob": 1.0})
    return out


def _files(tmp_path, sizes=(900, 1300, 800)) -> list[str]:
    files = []
    for k, n in enumerate(sizes):
        path = tmp_path / f"cand-{k}.parquet"
        pq.write_table(pa.Table.from_pylist(_rows(n, seed=k), SCHEMA), path, row_group_size=256)
        files.append(str(path))
    return files


def test_parts_hold_the_whole_list_s_rows_in_uid_ranges_with_hosts_spread_in_each(tmp_path, monkeypatch):
    monkeypatch.setattr(url_lists, "BATCH_ROWS", 200)  # several batches per file, pieces of a batch in each part
    files = _files(tmp_path)
    whole = _url_list(read_candidates(files))
    parts = url_lists.write_parted(files, str(tmp_path / "list.parquet"), COLUMNS, part_rows=700,
                                   tmp_dir=str(tmp_path))
    got = pq.read_table(tmp_path / "list.parquet")
    assert parts == 5 and got.num_rows == whole.num_rows == 3000
    assert got.schema == whole.schema
    assert got.sort_by("uid").equals(whole.sort_by("uid"))  # the same rows, every column
    # uid ranges in order, one block per part: each block is its range's rows, hosts spread as in a whole list
    bounds = url_lists._bounds(files, 3000, 5)  # the bounds write_parted cut at (a uid equal to one goes above)
    part_of = [bisect.bisect_right(bounds, u) for u in got.column("uid").to_pylist()]
    assert part_of == sorted(part_of) and sorted(set(part_of)) == list(range(5))
    offset = 0
    for p in range(5):
        n = part_of.count(p)
        assert 350 <= n <= 1050, n  # about part_rows
        block = got.slice(offset, n)
        offset += n
        assert block.equals(_url_list(block.sort_by("uid")))
    # deterministic: the same files and part size give the same bytes
    url_lists.write_parted(files, str(tmp_path / "again.parquet"), COLUMNS, part_rows=700, tmp_dir=str(tmp_path))
    assert (tmp_path / "list.parquet").read_bytes() == (tmp_path / "again.parquet").read_bytes()
    assert url_lists.same_list(str(tmp_path / "list.parquet"), str(tmp_path / "again.parquet"))
    assert not list(tmp_path.glob("clipline-url-list-*"))  # the temporary parts are gone


def test_duplicate_uids_across_files_and_bad_files_are_refused_and_nothing_is_written(tmp_path):
    files = _files(tmp_path, sizes=(500, 600))
    dup = pa.Table.from_pylist(_rows(500, seed=0)[123:124], SCHEMA)  # a row of the first file again
    pq.write_table(dup, tmp_path / "cand-dup.parquet")
    out = tmp_path / "list.parquet"
    with pytest.raises(CrawlError, match="1 duplicate uids"):
        url_lists.write_parted([*files, str(tmp_path / "cand-dup.parquet")], str(out), COLUMNS, part_rows=300,
                               tmp_dir=str(tmp_path))
    assert not out.exists() and not list(tmp_path.glob("clipline-url-list-*"))
    bad = pa.Table.from_pylist(_rows(50, seed=9), SCHEMA).drop_columns(["url"])
    pq.write_table(bad, tmp_path / "cand-bad.parquet")
    with pytest.raises(CrawlError, match=r"cand-bad\.parquet \(rows 0-49\): missing required column 'url'"):
        url_lists.write_parted([*files, str(tmp_path / "cand-bad.parquet")], str(out), COLUMNS, part_rows=300,
                               tmp_dir=str(tmp_path))
    (tmp_path / "cand-junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CrawlError, match=r"cand-junk\.parquet: not a readable Parquet file"):
        url_lists.write_parted([*files, str(tmp_path / "cand-junk.parquet")], str(out), COLUMNS, part_rows=300,
                               tmp_dir=str(tmp_path))
    assert not out.exists()


def test_the_reader_gets_files_of_whole_shards_numbered_as_the_whole_list(tmp_path):
    table = pa.table({"url": [f"u{i}" for i in range(1050)], "caption": ["c"] * 1050})
    pq.write_table(table, tmp_path / "list.parquet", row_group_size=77)
    assert url_lists.split_for_reader(str(tmp_path / "list.parquet"), str(tmp_path / "parts"), 2000) \
        == str(tmp_path / "list.parquet")  # fits one file: given as it is
    out = url_lists.split_for_reader(str(tmp_path / "list.parquet"), str(tmp_path / "parts"), 300)
    files = sorted((tmp_path / "parts").glob("*.parquet"))
    assert out == str(tmp_path / "parts") and [pq.read_metadata(f).num_rows for f in files] == [300, 300, 300, 150]
    assert pa.concat_tables([pq.read_table(f) for f in files]).equals(table)


@pytest.mark.slow
def test_a_crawl_built_in_parts_publishes_what_the_whole_list_crawl_publishes_and_resumes_only_the_same(tmp_path):
    """Round 0 (71 candidates) and the re-crawl round (25 server errors) listed in parts of 20 rows: the same
    outcome for every candidate as with whole lists, shard keys numbered on across the reader's files."""
    hosts = ("127.0.0.10", "127.0.0.11", "127.0.0.12")
    config = CrawlConfig(allow_cidrs=("127.0.0.8/29",), timeout=3, max_download_seconds=3, retries=0,
                         thread_count=8, number_sample_per_shard=10, image_size=64, per_host_rps=None,
                         backoff_base_seconds=0, recrawl_rounds=1)
    with HostileWeb(hosts) as web:
        urls = [web.url(hosts[i % 3], f"/ok/p{i}.jpg") for i in range(45)] + [web.url(hosts[0], "/status/404/q.jpg")]
        urls += [web.url(hosts[i % 3], f"/status/500/e{i}.jpg") for i in range(25)]
        rows = [{"uid": hashlib.sha256(u.encode()).hexdigest()[:32], "url": u, "caption": f"picture {i}",
                 "entry_ids": [i % 4], "lang": "en", "lang_score": 1.0, "keep_prob": 1.0} for i, u in enumerate(urls)]
        pq.write_table(pa.Table.from_pylist(rows[:30], SCHEMA), tmp_path / "a.parquet")
        pq.write_table(pa.Table.from_pylist(rows[30:], SCHEMA), tmp_path / "b.parquet")
        cands = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
        outcome, lists = {}, {}
        for name, part_rows in (("whole", 1000), ("parted", 20)):
            cfg = config.replace(url_list_part_rows=part_rows, staging_dir=str(tmp_path / f"staging-{name}"))
            rounds = crawl_all(cands, tmp_path / name, cfg)
            assert [r.n_rows for r in rounds] == [71, 25]
            shards = crawl_shard_files(str(tmp_path / name))
            table = pa.concat_tables([pq.read_table(p, columns=["uid", "status", "key"])
                                      for r, p, _t in shards if r == 0])
            assert sorted(int(k) for k in table.column("key").to_pylist()) == list(range(71))  # keys 0..70, once
            outcome[name] = {o["uid"]: (o["status"], o["reason"]) for o in crawl_outcome(str(tmp_path / name))
                             .failures.select(["uid", "status", "reason"]).to_pylist()}
            outcome[name]["successes"] = sorted(crawl_outcome(str(tmp_path / name)).successes.column("uid")
                                                .to_pylist())
            lists[name] = [storage.read_table(meta_uri(str(tmp_path / name), r, "input.parquet")) for r in (0, 1)]
        assert outcome["parted"] == outcome["whole"]
        assert len(outcome["parted"]["successes"]) == 45 and len(outcome["parted"]) == 1 + 26
        for r in (0, 1):  # the same rows, listed in parts (round 0: 4 uid ranges, round 1: 2): another order
            assert lists["parted"][r].sort_by("uid").equals(lists["whole"][r].sort_by("uid"))
            assert not lists["parted"][r].equals(lists["whole"][r])
        assert lists["parted"][1].column("prior_timeouts").to_pylist() == [0] * 25
        # resuming: the same candidates and part size are the same list; another part size is refused by name
        crawl_all(cands, tmp_path / "parted", config.replace(url_list_part_rows=20,
                                                              staging_dir=str(tmp_path / "staging-parted")))
        with pytest.raises(CrawlError, match="url_list_part_rows=20, now 30; use the same value"):
            crawl_all(cands, tmp_path / "parted", config.replace(url_list_part_rows=30,
                                                                  staging_dir=str(tmp_path / "staging-parted")))
