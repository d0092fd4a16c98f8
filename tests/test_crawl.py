"""The crawl stage end to end: img2dataset (spawned workers, real sockets) on a synthetic web with every failure
mode; a crawl killed mid-way and resumed; a re-crawl of the failures only; the stage contract; a crawl directory
on S3 (moto); the images stage reading the hashes computed in the crawl."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.crawl import (CrawlConfig, CrawlError, CrawlStage, crawl, crawl_outcome, crawl_shard_files,
                             list_rounds, recrawl_failures)
from pipelines.synthweb import EXPECTED_CRAWL_REASON, FAILURE_MODES, SynthWebServer, generate_web
from schemas import rejected as rejected_schema

ROOT = Path(__file__).resolve().parents[1]
# Generous timeouts: an answer of the (loaded, 2-core) test machine must never look like a stall. The synthetic
# web is one host: politeness is loosened (4 connections, no rate limit) so the test stays short.
CONFIG = CrawlConfig(allow_cidrs=("127.0.0.1/32",), retries=0, timeout=4, max_download_seconds=4, processes=1,
                     thread_count=4, number_sample_per_shard=30, image_size=64, per_host_connections=4,
                     per_host_rps=None)
ROBOTS = "/robots.txt"

pytestmark = pytest.mark.slow


def _uid(url: str, caption: str) -> str:
    return hashlib.sha256(f"{url}\x00{caption}".encode()).hexdigest()[:32]


def _write_candidates(pairs: Path, out: Path) -> dict[str, dict]:
    """Stand-in for curation: every pair becomes a candidate (entry ids derived from the concept)."""
    t = pq.read_table(pairs).to_pylist()
    rows = {}
    for r in t:
        uid = _uid(r["url"], r["caption"])
        eid = int(hashlib.sha256(r["concept"].encode()).hexdigest(), 16) % 50
        rows[uid] = {"uid": uid, "url": r["url"], "caption": r["caption"], "entry_ids": sorted({eid, 77}),
                     "lang": r["lang"], "lang_score": 0.9, "keep_prob": 0.5, "mode": r["failure_mode"],
                     "path": r["path"]}
    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                        ("entry_ids", pa.list_(pa.int32())), ("lang", pa.string()), ("lang_score", pa.float32()),
                        ("keep_prob", pa.float64())])
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows.values()], schema), out)
    return rows


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _hits(srv) -> dict:
    return {k: v for k, v in srv.hits.items() if k != ROBOTS}


@pytest.fixture(scope="module")
def crawled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crawl")
    web = tmp / "web"
    generate_web(web, 90, seed=7, n_kinds=3, n_colours=2, heldout_per_class=1)
    # latency slows every answer a little, so the crawl can be killed between its shards.
    with SynthWebServer(web, stall_seconds=10, drip_seconds=12, drip_interval=0.25, latency=0.15) as srv:
        pairs = srv.materialise_url_list()["parquet"]
        rows = _write_candidates(pairs, tmp / "candidates.parquet")
        out = tmp / "crawl"
        # the killed crawl's staging is where the resumed one looks for it: the same default, keyed by the dir
        # 1) A crawl in its own process group, killed (SIGKILL, workers included) once its first shard is done.
        code = (f"from pipelines.crawl import crawl, CrawlConfig; "
                f"crawl({str(tmp / 'candidates.parquet')!r}, {str(out)!r}, CrawlConfig.from_dict({CONFIG.to_dict()!r}))")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 240
            while not (out / "00000_stats.json").exists():
                assert proc.poll() is None, "crawl process ended before its first shard was done"
                assert time.monotonic() < deadline, "first shard not done in time"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        done_at_kill = sorted(p.name for p in out.glob("*_stats.json"))
        shard0 = _digests(out)
        # The killed crawl may already have asked for a flaky URL of a shard it did not finish, which would heal it
        # before the resumed crawl asks: the web is put back to what the finished shards alone have seen. A request
        # the killed crawl sent just before the kill is still in the server's handler (0.15 s of latency before
        # it counts a flaky answer): wait for those to end first, or one would heal its URL after the reset.
        time.sleep(1.0)
        srv.reset_flaky()
        for name in done_at_kill:
            finished = pq.read_table(out / name.replace("_stats.json", ".parquet"), columns=["uid"])
            for uid in finished.column(0).to_pylist():
                if rows[uid]["mode"] == "flaky":
                    srv._count_flaky(urlparse(rows[uid]["url"]).path)
        hits_after_kill = _hits(srv)
        # 2) The same crawl again, resumed in this process.
        sigint_before = signal.getsignal(signal.SIGINT)
        info = crawl(tmp / "candidates.parquet", out, CONFIG)
        hits_after_resume = _hits(srv)
        # img2dataset installs a SIGINT handler that exits with status 0; it must not outlive the crawl.
        assert signal.getsignal(signal.SIGINT) is sigint_before
        yield {"web": web, "out": out, "rows": rows, "info": info, "done_at_kill": done_at_kill, "server": srv,
               "shard0": shard0, "hits_after_kill": hits_after_kill, "hits_after_resume": hits_after_resume,
               "tmp": tmp, "outcome": crawl_outcome(out)}


def test_each_failure_mode_ends_in_its_reason(crawled):
    rows, outcome = crawled["rows"], crawled["outcome"]
    assert crawled["info"].complete and crawled["info"].n_shards == 3
    assert outcome.n_candidates == len(rows)
    got: dict[str, set] = {}
    for r in outcome.failures.to_pylist():
        got.setdefault(rows[r["uid"]]["mode"], set()).add(r["reason"])
    for r in outcome.successes.to_pylist():
        got.setdefault(rows[r["uid"]]["mode"], set()).add(None)
    for mode in FAILURE_MODES + ("ok",):
        # Without retries a flaky URL ends with its first answer (503); a re-crawl heals it (test below).
        expected = "http_5xx" if mode == "flaky" else EXPECTED_CRAWL_REASON[mode]
        assert got.get(mode) == {expected}, (mode, got.get(mode))


def test_guard_runs_inside_img2dataset_workers(crawled):
    srv = crawled["server"]
    assert sum(srv.private_hits.values()) == 0  # the redirect to 127.0.0.2 was never followed
    redirected = [r for r in crawled["rows"].values() if r["mode"] == "redirect_private"]
    assert redirected and all(crawled["hits_after_resume"][r["path"]] >= 1 for r in redirected)


def test_successes_carry_uid_and_entry_ids_into_the_shards(crawled):
    out, rows = crawled["out"], crawled["rows"]
    successes = crawled["outcome"].successes.to_pylist()
    assert len(successes) >= 60
    members: dict[str, dict[str, bytes]] = {}
    for tar_name in {s["tar"] for s in successes}:
        with tarfile.open(out / tar_name) as tf:
            members[tar_name] = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    for s in successes:
        cand = rows[s["uid"]]
        assert s["entry_ids"] == cand["entry_ids"] and s["url"] == cand["url"] and s["caption"] == cand["caption"]
        files = members[s["tar"]]
        meta = json.loads(files[f"{s['key']}.json"])
        assert meta["uid"] == s["uid"] and meta["entry_ids"] == cand["entry_ids"] and meta["keep_prob"] == 0.5
        assert files[f"{s['key']}.txt"].decode() == cand["caption"]
        img = Image.open(io.BytesIO(files[s["member"]]))
        assert max(img.size) <= 64 and (s["width"], s["height"]) == img.size  # keep ratio, longest side 64
        assert hashlib.sha256(files[s["member"]]).hexdigest() != s["sha256"]  # sha256 is of the original bytes
        assert hashlib.sha256(files[s["member"]]).hexdigest() == s["img_sha256"]  # img_sha256: the published ones
        assert set(meta) & {"phash", "jpg_offset", "fetch_seconds", "prior_timeouts"} == set()  # tar JSON as before
    images = list(crawled["outcome"].iter_images())
    assert len(images) == len(successes)
    assert all(members[row["tar"]][row["member"]] == data for row, data in images)
    schema = pq.read_schema(out / "00000.parquet")
    assert schema.field("entry_ids").type == pa.list_(pa.int32())


def test_rejected_rows_follow_the_schema_and_add_up(crawled):
    outcome, rows = crawled["outcome"], crawled["rows"]
    rejected = outcome.rejected
    assert rejected.schema.equals(rejected_schema.SCHEMA, check_metadata=True)
    assert set(rejected.column("stage").to_pylist()) == {"crawl"}
    ok_uids = set(outcome.successes.column("uid").to_pylist())
    bad_uids = set(rejected.column("uid").to_pylist())
    assert not ok_uids & bad_uids and ok_uids | bad_uids == set(rows)
    for r in rejected.to_pylist():
        assert (r["url"], r["caption"]) == (rows[r["uid"]]["url"], rows[r["uid"]]["caption"])
        assert r["source"].startswith("crawl/0000")
    assert sum(outcome.reasons.values()) == rejected.num_rows


def test_killed_crawl_resumes_without_redownloading_finished_shards(crawled):
    done = crawled["done_at_kill"]
    assert "00000_stats.json" in done and len(done) < 3, done  # killed mid-crawl, shard 0 finished
    out = crawled["out"]
    finished_paths = {crawled["rows"][u]["path"] for u in pq.read_table(out / "00000.parquet").column("uid").to_pylist()}
    before, after = crawled["hits_after_kill"], crawled["hits_after_resume"]
    for path in finished_paths:
        assert after.get(path) == before.get(path), path  # nothing of a finished shard was fetched again
    # Every unfinished row was fetched by the resumed run.
    unfinished = {r["path"] for r in crawled["rows"].values()} - finished_paths
    assert all(after[p] > before.get(p, 0) for p in unfinished)
    # The finished shard's files were left as they were.
    assert {k: v for k, v in _digests(out).items() if k.startswith("00000")} == \
        {k: v for k, v in crawled["shard0"].items() if k.startswith("00000")}


def test_bad_inputs_and_mismatched_reruns_give_clear_errors(crawled):
    tmp, out = crawled["tmp"], crawled["out"]
    bad = tmp / "bad.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/x.jpg"], "caption": ["x"]}), bad)
    with pytest.raises(CrawlError, match=r"bad\.parquet.*uid"):
        crawl(bad, tmp / "other", CONFIG)
    with pytest.raises(CrawlError, match="no such candidates"):
        crawl(tmp / "missing.parquet", tmp / "other", CONFIG)
    fewer = tmp / "fewer.parquet"
    pq.write_table(pq.read_table(tmp / "candidates.parquet").slice(0, 10), fewer)
    with pytest.raises(CrawlError, match=r"different URL list.*0 uids added, \d+ removed"):
        crawl(fewer, out, CONFIG)
    with pytest.raises(CrawlError, match="image_size"):
        crawl(tmp / "candidates.parquet", out, CONFIG.replace(image_size=128))
    with pytest.raises(CrawlError, match="round 1"):
        recrawl_failures(out, CONFIG, round_no=2)


def test_recrawl_fetches_only_failures_into_new_shards(crawled):
    out, rows, srv = crawled["out"], crawled["rows"], crawled["server"]
    round0 = _digests(out)
    failed = {r["uid"]: r["reason"] for r in crawled["outcome"].failures.to_pylist()}
    srv.reset_hits()
    # From a worker thread, as Prefect's task runner calls it (img2dataset's signal set-up must not break it).
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(info=recrawl_failures(out, CONFIG, round_no=1)))
    worker.start()
    worker.join(timeout=300)
    info = result["info"]
    assert info.directory == str(out / "recrawl-001") and info.complete
    retried = {rows[u]["path"] for u, reason in failed.items()
               if reason in ("http_5xx", "timeout_headers", "timeout_body", "truncated")}
    assert set(_hits(srv)) == retried  # no success and no permanent failure (404, opt-out, blocked...) re-fetched
    assert _digests(out) == round0  # round 0's shards untouched
    outcome = crawl_outcome(out)
    flaky = [u for u, r in rows.items() if r["mode"] == "flaky"]
    assert flaky and all(u in set(outcome.successes.column("uid").to_pylist()) for u in flaky)
    healed = outcome.successes.filter(pa.compute.equal(outcome.successes.column("round"), 1))
    assert set(healed.column("uid").to_pylist()) == set(flaky)
    assert healed.column("tar").to_pylist()[0] == "recrawl-001/00000.tar"
    assert outcome.n_candidates == len(rows)
    # Idempotent: the finished round is not crawled again.
    srv.reset_hits()
    recrawl_failures(out, CONFIG, round_no=1)
    assert sum(srv.hits.values()) == 0
    assert [r.round_no for r in list_rounds(out)] == [0, 1]
    files = crawl_shard_files(out)
    assert [(r, Path(p).relative_to(out).as_posix()) for r, p, _ in files] == \
        [(0, "00000.parquet"), (0, "00001.parquet"), (0, "00002.parquet"), (1, "recrawl-001/00000.parquet")]


def test_crawl_stage_result_and_rejected_rows(crawled):
    out, rows, srv = crawled["out"], crawled["rows"], crawled["server"]
    srv.reset_hits()
    rejected_uri = str(crawled["tmp"] / "rejected" / "crawl.parquet")
    stage = CrawlStage(CONFIG.replace(recrawl_rounds=1), {"candidates": str(crawled["tmp"] / "candidates.parquet")},
                       str(out), rejected=rejected_uri)
    result = stage.run()
    assert sum(_hits(srv).values()) == 0  # rounds 0 and 1 are finished: nothing is downloaded again
    assert result.stage == "crawl" and result.input_rows == len(rows) and not result.reused
    outcome = crawl_outcome(out)
    assert result.kept == outcome.successes.num_rows and result.rejected == dict(outcome.reasons)
    rejected = pq.read_table(rejected_uri)
    assert rejected.schema.equals(rejected_schema.SCHEMA, check_metadata=True)
    assert rejected.num_rows == sum(result.rejected.values()) and set(rejected.column("stage").to_pylist()) == {"crawl"}
    shards = result.outputs["shards"]
    assert str(out / "00000.tar") in shards and str(out / "recrawl-001" / "00000_stats.json") in shards
    assert result.params["per_host_connections"] == 4 and result.details["rounds"][1]["round"] == 1
    host = next(iter(result.details["hosts"]))
    assert host.startswith("http://127.0.0.1:") and result.details["hosts"][host]["downloaded"] >= result.kept
    # A rerun is the recorded result; deleting a published shard file makes the next run redo that shard.
    again = CrawlStage(CONFIG.replace(recrawl_rounds=1), {"candidates": str(crawled["tmp"] / "candidates.parquet")},
                       str(out), rejected=rejected_uri).run()
    assert again.reused and again.to_dict() == result.to_dict()
    (out / "00002_stats.json").unlink()
    srv.reset_hits()
    redone = CrawlStage(CONFIG.replace(recrawl_rounds=1), {"candidates": str(crawled["tmp"] / "candidates.parquet")},
                        str(out), rejected=rejected_uri).run()
    shard2 = {rows[u]["path"] for u in pq.read_table(out / "00002.parquet").column("uid").to_pylist()}
    assert not redone.reused and set(_hits(srv)) == shard2  # only shard 2's URLs were fetched again
    assert redone.input_rows == result.input_rows


def test_stage_inputs_are_checked():
    from pipelines.core.errors import ConfigError

    with pytest.raises(ConfigError, match="candidates"):
        CrawlStage({}, {"pairs": "x"}, "out")
    with pytest.raises(ConfigError, match="crawl.threads: unknown key"):
        CrawlStage({"threads": 4}, {"candidates": "x"}, "out")
