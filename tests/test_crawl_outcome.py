"""A crawl's outcome read from its rounds (pipelines.crawl.results, column-wise in Arrow), on a crawl directory
written by hand so that every rule is exercised: the earliest success wins, else the latest failure; a candidate
absent from every shard is ``missing_from_output``; rows of no candidate are ignored; both tables keep the order of
round 0's URL list; members are named with each round's encode format; the re-crawl list keeps timeouts."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.crawl import CrawlConfig, crawl_outcome
from pipelines.crawl.driver import retry_candidates
from pipelines.crawl.results import ShardLayoutError, iter_outcomes, merge_outcomes
from pipelines.crawl.rounds import meta_uri, round_dir

SHARD = 3


def _round(crawl_dir, round_no, url_list, shards, *, encode_format="jpg"):
    """Write a round: its URL list, its config and finished shards (rows: uid, status, reason, timeouts)."""
    (crawl_dir / "_clipline").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "url": [f"http://h{u[-1]}.test/{u}.jpg" for u in url_list],
        "caption": [f"caption {u}" for u in url_list],
        "uid": url_list,
        "entry_ids": pa.array([[i, 7] for i, _ in enumerate(url_list)], pa.list_(pa.int32())),
    }), meta_uri(str(crawl_dir), round_no, "input.parquet"))
    config = CrawlConfig(number_sample_per_shard=SHARD, encode_format=encode_format)
    with open(meta_uri(str(crawl_dir), round_no, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    out = round_dir(str(crawl_dir), round_no)
    Path(out).mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(shards):
        keys = [f"{round_no}{i:04d}{j:04d}" for j in range(len(rows))]
        success = [r[1] == "success" for r in rows]
        pq.write_table(pa.table({
            "key": keys,
            "uid": [r[0] for r in rows],
            "url": [f"http://h{r[0][-1]}.test/{r[0]}.jpg" for r in rows],
            "caption": [f"caption {r[0]}" for r in rows],
            "entry_ids": pa.array([[1, 7]] * len(rows), pa.list_(pa.int32())),
            "status": [r[1] for r in rows],
            "error_message": [None if ok else r[2] for ok, r in zip(success, rows)],
            "reason": pa.array([r[3] if len(r) > 3 else None for r in rows], pa.string()),
            "timeouts": pa.array([r[4] if len(r) > 4 else 0 for r in rows], pa.int32()),
            "width": pa.array([64 if ok else None for ok in success], pa.int64()),
            "jpg_offset": pa.array([512 * (j + 1) if ok else None for j, ok in enumerate(success)], pa.int64()),
        }), f"{out}/{i:05d}.parquet")
        open(f"{out}/{i:05d}.tar", "wb").close()
        with open(f"{out}/{i:05d}_stats.json", "w") as f:
            json.dump({"successes": sum(success)}, f)


def test_outcome_rules_over_rounds(tmp_path):
    crawl_dir = tmp_path / "crawl"
    order = ["u5", "u1", "u4", "u2", "u3", "u6"]  # round 0's list is in host-spread order, not uid order
    _round(crawl_dir, 0, order, [
        [("u5", "failed_to_download", "HTTP Error 503: Service Unavailable"),
         ("u1", "success", None),
         ("u4", "failed_to_download", "timed out", "timeout_body", 1)],
        [("u2", "failed_to_download", "HTTP Error 404: Not Found"),
         ("zz", "success", None),  # a row of no candidate: not an outcome
         # u3 is in no shard: missing_from_output
         ("u6", "failed_to_download", "connection refused", "connection_refused")],
    ])
    _round(crawl_dir, 1, ["u4", "u5", "u6"], [
        [("u5", "success", None), ("u4", "failed_to_download", "timed out", "timeout_body", 2),
         ("u6", "failed_to_download", "HTTP Error 429: Too Many Requests")],
    ], encode_format="webp")

    first = crawl_outcome(str(crawl_dir), max_round=0)
    assert first.successes.column("uid").to_pylist() == ["u1"]
    assert first.failures.column("uid").to_pylist() == ["u5", "u4", "u2", "u3", "u6"]
    assert first.reasons == {"http_5xx": 1, "timeout_body": 1, "http_404": 1, "missing_from_output": 1,
                             "connection_refused": 1}

    out = crawl_outcome(str(crawl_dir))
    ok = out.successes.to_pylist()
    assert [(r["uid"], r["round"], r["member"]) for r in ok] == [("u5", 1, "100000000.webp"), ("u1", 0, "000000001.jpg")]
    assert out.successes.schema.field("entry_ids").type == pa.list_(pa.int32())
    assert out.successes.column("width").type == pa.int32() and ok[0]["width"] == 64 and ok[0]["jpg_offset"] == 512
    failed = {r["uid"]: r for r in out.failures.to_pylist()}
    assert list(failed) == ["u4", "u2", "u3", "u6"]  # round 0's order
    assert (failed["u4"]["round"], failed["u4"]["reason"], failed["u4"]["timeouts"]) == (1, "timeout_body", 2)
    assert (failed["u6"]["round"], failed["u6"]["reason"]) == (1, "http_429")  # the latest attempt's reason
    assert (failed["u2"]["round"], failed["u2"]["reason"]) == (0, "http_404")
    assert failed["u3"]["reason"] == "missing_from_output" and failed["u3"]["key"] is None
    assert failed["u3"]["caption"] == "caption u3" and failed["u3"]["entry_ids"] == [order.index("u3"), 7]
    assert out.n_candidates == len(order)

    rejected = {r["uid"]: r for r in out.rejected.to_pylist()}
    assert rejected["u3"]["source"] == "crawl:u3"
    assert rejected["u2"]["source"] == "crawl/00001.parquet:000010000"
    assert rejected["u6"]["source"] == "crawl/recrawl-001/00000.parquet:100000002"

    # In parts of one round-0 shard each (what a large crawl's readers iterate): the same rows, in the same order;
    # the row of no candidate ("zz") sits in a shard outside its slice and is ignored there as well.
    parts = list(iter_outcomes(str(crawl_dir), rows_per_part=SHARD))
    assert [p.n_candidates for p in parts] == [3, 3]
    whole = merge_outcomes(str(crawl_dir), parts)
    assert whole.successes.equals(out.successes) and whole.failures.equals(out.failures)
    assert whole.reasons == out.reasons

    # The next round fetches again what can still succeed, never a URL that timed out twice.
    retry = retry_candidates(str(crawl_dir), 2)
    assert retry.column("uid").to_pylist() == ["u6"]
    assert retry_candidates(str(crawl_dir), 2, "all").column("uid").to_pylist() == ["u2", "u3", "u6"]
    assert retry_candidates(str(crawl_dir), 2, "http_404").column("uid").to_pylist() == ["u2"]
    assert retry_candidates(str(crawl_dir), 1).column("prior_timeouts").to_pylist() == [1, 0, 0]  # u4, u5, u6


def test_a_success_is_final_even_if_a_later_round_fails_it(tmp_path):
    crawl_dir = tmp_path / "crawl"
    _round(crawl_dir, 0, ["a", "b"], [[("a", "success", None), ("b", "failed_to_download", "timed out")]])
    _round(crawl_dir, 1, ["a", "b"], [[("a", "failed_to_download", "timed out"), ("b", "success", None)]])
    out = crawl_outcome(str(crawl_dir))
    assert [(r["uid"], r["round"]) for r in out.successes.to_pylist()] == [("a", 0), ("b", 1)]
    assert out.failures.num_rows == 0 and out.reasons == {}
    assert out.rejected.num_rows == 0


def test_a_shard_outside_its_slice_is_caught_and_decided_whole(tmp_path):
    """Round-0 shard i holds slice i of the URL list; a directory that breaks this (never one this package wrote)
    is detected, and crawl_outcome then decides over the whole crawl: the same outcome as a correct layout."""
    crawl_dir = tmp_path / "crawl"
    _round(crawl_dir, 0, ["a", "b", "c", "d"], [[("a", "success", None), ("d", "success", None), ("c", "success", None)],
                                                [("b", "failed_to_download", "HTTP Error 404: Not Found")]])
    with pytest.raises(ShardLayoutError):
        list(iter_outcomes(str(crawl_dir), rows_per_part=SHARD))
    out = crawl_outcome(str(crawl_dir))
    assert out.successes.column("uid").to_pylist() == ["a", "c", "d"]
    assert out.reasons == {"http_404": 1}
