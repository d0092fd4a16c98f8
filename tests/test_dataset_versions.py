"""Dataset versions end to end on the synthetic web (flows.versions.build_version under Prefect's real server).

One root goes through a short life, each step checked by counting server requests and reused stages, never by
timing: v1 from three URL-list files; v2 adds a fourth file (only its URLs are requested, and v2 is byte-identical
to a from-scratch build of the four files with the same seed and as_of); an unchanged schedule run writes nothing;
a takedown + --rebuild-latest gives v3 with no request at all (a first attempt killed with -9 at a random point
leaves LATEST on v2 or on a complete v3); a day later v4 with one more evaluation set re-requests exactly the
transient failures now due and re-decontaminates every sample.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core import storage

pytestmark = pytest.mark.slow

T0 = "2025-03-01T00:00:00Z"
T_2H = "2025-03-01T02:00:00Z"
T_3H = "2025-03-01T03:00:00Z"
T_1D3H = "2025-03-02T03:00:00Z"
N_ROWS, N_OLD = 120, 108  # rows of the session's synthetic web used here; the 4th file adds the last 10%
ROOT_DIR = Path(__file__).resolve().parents[1]


def _cfg(web, inputs: Path, **kw):
    from tests.conftest import synth_build_config

    crawl = {"per_host_rps": None, "per_host_connections": 16, **kw.pop("crawl", {})}
    return synth_build_config({**web, "pairs": str(inputs / "part-*.parquet")}, "unused", t=15, crawl=crawl, **kw)


def _paths(urls) -> set[str]:
    return {urlsplit(u).path for u in urls}


def _hit_paths(server) -> set[str]:
    return {p for p in server.hits if p != "/robots.txt"}


def _candidates(root: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((root / "work/curate/candidates").glob("*.parquet"))])


def _shard_bytes(version_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((version_dir / "shards").iterdir()) if p.suffix in (".tar", ".parquet")}


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def life(prefect_server, synth_web_small, tmp_path_factory):
    """v1 (3 files, T0) and v2 (+1 file, T0 + 2 h) of one root, with the server requests of each."""
    from flows.versions import build_version

    web, server = synth_web_small, synth_web_small["server"]
    base = tmp_path_factory.mktemp("dsversions")
    pairs = pq.read_table(web["pairs"]).slice(0, N_ROWS)
    inputs = base / "inputs"
    inputs.mkdir()
    for i in range(3):
        pq.write_table(pairs.slice(i * N_OLD // 3, N_OLD // 3), inputs / f"part-{i}.parquet")
    cfg = _cfg(web, inputs)
    root = base / "root"
    server.reset_hits()
    r1 = build_version(str(root), cfg, as_of=T0)
    hits1 = _hit_paths(server)
    curated1 = _curated_files(root)
    pq.write_table(pairs.slice(N_OLD, N_ROWS - N_OLD), inputs / "part-3.parquet")
    server.reset_hits()
    r2 = build_version(str(root), cfg, as_of=T_2H)
    hits2 = _hit_paths(server)
    return {"web": web, "server": server, "base": base, "inputs": inputs, "root": root, "cfg": cfg,
            "old_urls": pairs.slice(0, N_OLD).column("url").to_pylist(), "r1": r1, "r2": r2,
            "hits1": hits1, "hits2": hits2, "curated1": curated1, "curated2": _curated_files(root)}


def _curated_files(root: Path) -> dict[str, int]:
    """The per-file curation cache's complete entries (file sha256 -> mtime of the entry's last file)."""
    return {p.parent.name: p.stat().st_mtime_ns for p in (root / "curate_cache").glob("*/*/_DONE.json")}


def test_v2_requests_only_new_urls_and_equals_a_from_scratch_build(life):
    from flows.versions import build_version
    from pipelines.dataset.versions import comparable_manifest

    root = life["root"]
    assert life["r1"]["status"] == life["r2"]["status"] == "built" and (root / "LATEST").read_text() == "0002\n"
    cand_paths = _paths(_candidates(root).column("url").to_pylist())
    new_paths = cand_paths - _paths(life["old_urls"])
    assert new_paths and len(life["hits1"]) > len(new_paths)
    # v2 requested exactly its new candidates' URLs, and not one URL of v1
    assert life["hits2"] & cand_paths == new_paths
    assert not life["hits2"] & _paths(life["old_urls"])
    m2 = json.loads((root / "versions/0002/manifest.json").read_text())
    assert m2["crawl"]["crawl_store"]["fetch"] == len(new_paths) and m2["crawl"]["crawl_store"]["reused_ok"] > 0
    assert m2["dataset"]["parent"]["version"] == 1 and m2["dataset"]["as_of"] == T_2H
    # decontamination matched only the images v1 had not matched (the rest came from the root's per-image cache)
    m1 = json.loads((root / "versions/0001/manifest.json").read_text())
    act1, act2 = m1["decontam"]["activity"], m2["decontam"]["activity"]
    assert act1["from_cache"] == 0 and act1["matched_now"] == m1["decontam"]["pool_ok"]
    assert act2["from_cache"] > 0 and act2["from_cache"] + act2["matched_now"] == m2["decontam"]["pool_ok"]
    cached = pa.concat_tables([pq.read_table(p) for p in sorted((root / "decontam_cache").rglob("part-*.parquet"))])
    assert cached.num_rows == len(set(cached.column("sha256").to_pylist())) == act1["matched_now"] + act2["matched_now"]
    assert [i["uri"] for i in m2["lineage"]["inputs"]] == sorted(str(p) for p in life["inputs"].glob("*.parquet"))
    # curation read only the new file: v1's three entries untouched, one new entry (the 4th file's content hash)
    c1, c2 = life["curated1"], life["curated2"]
    assert len(c1) == 3 and {k: c2[k] for k in c1} == c1
    assert set(c2) - set(c1) == {storage.sha256_of(str(life["inputs"] / "part-3.parquet"))}

    # from scratch, at the same path (the incremental root moved aside): same shards, same manifest
    incremental = root.with_name("root-incremental")
    root.rename(incremental)
    try:
        life["server"].reset_hits()
        scratch = build_version(str(root), life["cfg"], as_of=T_2H)
        assert scratch["version"] == 1 and _hit_paths(life["server"]) & cand_paths == cand_paths
        a, b = incremental / "versions/0002", root / "versions/0001"
        assert _shard_bytes(a) == _shard_bytes(b) and len(_shard_bytes(a)) >= 2
        ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
        assert comparable_manifest(ma) == comparable_manifest(mb)
        assert ma["stages"] == mb["stages"]  # every stage fingerprint too
    finally:
        root.rename(root.with_name("root-scratch"))
        incremental.rename(root)


def test_unchanged_schedule_run_writes_nothing(life):
    from flows.versions import build_version

    before = _snapshot(life["base"])
    life["server"].reset_hits()
    r = build_version(str(life["root"]), life["cfg"], as_of=T_3H)
    assert r["status"] == "unchanged" and "no version written" in r["message"] and r["version"] == 2
    assert _snapshot(life["base"]) == before and not _hit_paths(life["server"])


def test_takedown_rebuild_latest_removes_samples_and_bytes_without_downloading(life):
    from flows.versions import build_version
    from pipelines.dataset.crawl_store import CrawlStore, url_hash
    from pipelines.dataset.diff import diff_versions
    from pipelines.dataset.versions import DatasetRoot

    root = life["root"]
    v2 = pa.concat_tables([pq.read_table(p) for p in sorted((root / "versions/0002/shards").glob("*.parquet"))])
    urls, uid = v2.column("url").to_pylist()[:2], v2.column("uid").to_pylist()[5]
    (life["base"] / "td-urls.txt").write_text("# press request\n" + "\n".join(urls) + "\n\n")
    (life["base"] / "td-uids.txt").write_text(uid + "\n")
    (life["base"] / "td-bad.txt").write_text(urls[0] + "\nnot a url\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    cli = [sys.executable, "-m", "flows.cli_versions", "takedown", str(root)]
    bad = subprocess.run(cli + ["--urls", str(life["base"] / "td-bad.txt")], capture_output=True, text=True,
                         env=env, cwd=ROOT_DIR)
    assert bad.returncode == 2 and "td-bad.txt:2: expected an http(s) URL" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (root / "takedowns").exists()
    ok = subprocess.run(cli + ["--urls", str(life["base"] / "td-urls.txt")], capture_output=True, text=True,
                        env=env, cwd=ROOT_DIR)
    assert ok.returncode == 0, ok.stderr
    assert "recorded 2 url(s)" in ok.stdout and "deleted for 2 URL(s)" in ok.stdout
    from flows.versions import record_takedown

    record_takedown(str(root), "uid", str(life["base"] / "td-uids.txt"))

    life["server"].reset_hits()
    # a rebuild killed with -9 at a random point leaves LATEST on v2 or on a complete v3, never on anything else
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(3.0, 60.0)
    script = "import sys; from flows.versions import build_version; build_version(sys.argv[1], None, rebuild_latest=True)"
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=ROOT_DIR, start_new_session=True,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    latest = int((root / "LATEST").read_text())
    assert latest in (2, 3), (seed, delay)
    _assert_complete(root, latest)
    r3 = build_version(str(root), None, rebuild_latest=True)  # finishes (or repeats) what the killed run did
    n3 = r3["version"]
    assert n3 == int((root / "LATEST").read_text()) == latest + 1 and n3 in (3, 4), (seed, delay)
    _assert_complete(root, n3)
    assert not _hit_paths(life["server"])  # no download at all
    assert "curate" in r3["reused"]
    v3 = pa.concat_tables([pq.read_table(p) for p in sorted((root / f"versions/{n3:04d}/shards").glob("*.parquet"))])
    gone = {u for u, x in zip(v2.column("uid").to_pylist(), v2.column("url").to_pylist()) if x in urls} | {uid}
    assert not gone & set(v3.column("uid").to_pylist())
    rejected = pq.read_table(root / f"versions/{n3:04d}/rejected/crawl.parquet").to_pylist()
    assert {r["uid"] for r in rejected if r["reason"] == "takedown"} >= gone
    # the stored bytes are gone from the crawl store's packs
    store = CrawlStore.open(str(root / "crawl_store"))
    for url in urls:
        assert store.get(url)["status"] == "deleted"
    members = _pack_members(root / "crawl_store/packs")
    gone_hashes = {url_hash(u) for u in urls}
    assert not {name.split(".")[0] for name in members} & gone_hashes
    live = {e["url_hash"] for e in store.index().values() if e["status"] == "ok"}
    for uid_ in {u for u, x in zip(v2.column("uid").to_pylist(), v2.column("url").to_pylist()) if x in urls}:
        image = _image_of(root / "versions/0002", uid_)
        # the same bytes may stay only as the image of another URL that was not taken down (an exact duplicate)
        holders = {name.split(".")[0] for name, data in members.items() if data == image}
        assert holders <= live - gone_hashes, holders
    # the diff names the takedowns, the card counts them
    d = diff_versions(DatasetRoot.open(str(root)), 2, n3)
    assert d["removed_by_reason"].get("takedown") == len(gone)
    assert all(d["why"][u] == "takedown" for u in gone)
    card = (root / f"versions/{n3:04d}/README.md").read_text()
    assert f"Takedowns applied: {len(gone)} pair(s) left out, from 2 recorded request(s)" in card
    assert card.startswith("---\nlicense: ") and "size_categories:" in card
    assert (root / f"versions/{n3:04d}/card.html").stat().st_size > 10_000
    m3 = json.loads((root / f"versions/{n3:04d}/manifest.json").read_text())
    assert m3["funnel"]["rejected"]["crawl:takedown"] == len(gone) and m3["dataset"]["parent"]["version"] == n3 - 1


def _pack_members(packs: Path) -> dict[str, bytes]:
    import tarfile

    out = {}
    for pack in sorted(packs.iterdir()):
        with tarfile.open(pack) as tf:
            for m in tf.getmembers():
                out[m.name] = tf.extractfile(m).read()
    return out


def _image_of(version_dir: Path, uid: str) -> bytes:
    import tarfile

    for tar_path in sorted((version_dir / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                if m.name == f"{uid}.jpg":
                    return tf.extractfile(m).read()
    raise AssertionError(uid)


def test_a_day_later_due_failures_are_retried_and_a_new_eval_set_redecontaminates_all(life):
    from flows.versions import build_version
    from pipelines.dataset.crawl_store import CrawlStore

    root = life["root"]
    latest = int((root / "LATEST").read_text())
    failed = pq.read_table(root / f"versions/{latest:04d}/rejected/crawl.parquet").to_pylist()
    store = CrawlStore.open(str(root / "crawl_store"))
    due = set(store.due(T_1D3H, [r["url"] for r in failed if r["reason"] != "takedown"]))
    reasons = {r["reason"] for r in failed if r["url"] in due}
    assert due and reasons <= {"timeout", "timeout_headers", "timeout_body", "http_5xx", "truncated", "http_429"}
    assert any(r["reason"] == "http_404" and r["url"] not in due for r in failed)  # 404s wait 30 days

    cfg = life["cfg"].replace(decontam=life["cfg"].decontam.replace(
        eval_sets=tuple(life["cfg"].decontam.eval_sets) + ("digits",)))
    life["server"].reset_hits()
    r4 = build_version(str(root), cfg, as_of=T_1D3H)
    cand_paths = _paths(_candidates(root).column("url").to_pylist())
    assert _hit_paths(life["server"]) & cand_paths == _paths(due)
    assert "curate" in r4["reused"] and "decontam" not in r4["reused"]
    m4 = json.loads((root / f"versions/{r4['version']:04d}/manifest.json").read_text())
    assert "digits" in m4["decontam"]["eval_sets"]
    assert m4["decontam"]["pool_ok"] == m4["funnel"]["stages"]["images"]["out"]  # every sample, not only new ones
    assert m4["crawl"]["crawl_store"]["due_retry"] == len(due)


def _assert_complete(root: Path, n: int) -> None:
    d = root / f"versions/{n:04d}"
    info = json.loads((d / "VERSION.json").read_text())
    manifest = json.loads((d / "manifest.json").read_text())
    assert info["version"] == n and (d / "README.md").exists()
    for s in manifest["shards"]:
        assert (d / "shards" / s["name"]).stat().st_size > 0


def _crawl_dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_store_crawl_records_in_batches_and_a_kill_while_recording_reruns_without_downloading(
        life, tmp_path, monkeypatch):
    """The crawl store stage records a fetch a batch of images at a time (bounded memory); the crawl directory
    does not depend on the batches; a build killed after some batches were recorded reruns without downloading
    anything again and ends with the same crawl directory and one attempt per URL."""
    from flows.build import plan_stages
    from pipelines.dataset import store_crawl
    from pipelines.dataset.crawl_store import CrawlStore
    from pipelines.dataset.store_crawl import StoreCrawlStage

    server = life["server"]
    crawl_cfg = next(s for s in plan_stages(life["cfg"]) if s.name == "crawl").config
    (tmp_path / "cands").mkdir()
    pq.write_table(_candidates(life["root"]).slice(0, 60), tmp_path / "cands" / "part-00000.parquet")
    cands = str(tmp_path / "cands")

    def stage(name: str) -> StoreCrawlStage:
        d = tmp_path / name
        return StoreCrawlStage(crawl_cfg, {"candidates": cands}, str(d / "crawl"), store=str(d / "store"),
                               as_of=T0, fetch_dir=str(d / "fetch"))

    def outcome(r) -> tuple:
        return r.details["fetch"]["urls"], r.details["fetch"]["successes"], r.details["fetch"]["failures"]

    server.reset_flaky()  # every crawl below meets the flaky routes as the first one does
    r_whole = stage("whole").compute("fp")
    monkeypatch.setattr(store_crawl, "RECORD_BYTES", 1)  # one image per recorded batch
    server.reset_flaky()
    r_batched = stage("batched").compute("fp")
    n_ok = r_batched.details["fetch"]["successes"]
    assert n_ok > 10 and outcome(r_batched) == outcome(r_whole) and r_whole.details["fetch"]["failures"]
    assert len(list((tmp_path / "batched/store/packs").iterdir())) == n_ok
    assert len(list((tmp_path / "whole/store/packs").iterdir())) == 1
    assert _crawl_dir_bytes(tmp_path / "batched/crawl") == _crawl_dir_bytes(tmp_path / "whole/crawl")

    server.reset_flaky()
    killed = stage("killed")
    real_record, calls = CrawlStore.record, []

    def record_then_die(self, results, as_of, layout=None):
        if len(calls) == 5:
            raise KeyboardInterrupt("killed while recording")
        calls.append(1)
        return real_record(self, results, as_of, layout)

    monkeypatch.setattr(CrawlStore, "record", record_then_die)
    with pytest.raises(KeyboardInterrupt):
        killed.compute("fp")
    monkeypatch.setattr(CrawlStore, "record", real_record)
    assert len(list((tmp_path / "killed/store/packs").iterdir())) == 5
    server.reset_hits()
    r_killed = stage("killed").compute("fp")
    assert not _hit_paths(server)  # the finished fetch was read again, nothing downloaded
    assert r_killed.details["crawl_store"]["reused_ok"] == 5
    assert _crawl_dir_bytes(tmp_path / "killed/crawl") == _crawl_dir_bytes(tmp_path / "whole/crawl")
    store = CrawlStore.open(str(tmp_path / "killed/store"))
    assert set(store.index_table().column("attempts").to_pylist()) == {1}
    assert store.stats()["by_status"] == CrawlStore.open(str(tmp_path / "whole/store")).stats()["by_status"]
    assert not (tmp_path / "killed/fetch").exists() or not any((tmp_path / "killed/fetch").rglob("*.parquet"))
