"""Dataset roots without a build: version numbers and LATEST (also under kill -9 while publishing), takedown files
(bad lines name FILE:LINE, nothing written), matching, diff reasons, and the CLI's one-line errors (exit code 2)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.core.errors import ClipError
from pipelines.dataset import takedown as TD
from pipelines.dataset.diff import added_reason, removed_reason
from pipelines.dataset.versions import DatasetError, DatasetRoot, comparable_manifest, publish

ROOT_DIR = Path(__file__).resolve().parents[1]
UID = "0123456789abcdef0123456789abcdef"


def _staging(tmp_path: Path, n_shards: int = 12) -> Path:
    """A finished build output as build_dataset leaves it (shards, rejected rows, a valid manifest)."""
    staging = tmp_path / "staging"
    (staging / "shards").mkdir(parents=True)
    (staging / "rejected").mkdir()
    shards = []
    for i in range(n_shards):
        (staging / "shards" / f"{i:05d}.tar").write_bytes(os.urandom(4096))
        (staging / "shards" / f"{i:05d}.parquet").write_bytes(os.urandom(512))
        shards.append({"name": f"{i:05d}.tar", "n": 2, "tar_sha256": "x", "parquet_sha256": "y"})
    (staging / "shards" / "sizes.json").write_text("{}")
    (staging / "rejected" / "crawl.parquet").write_bytes(b"PAR1")
    tools = {t: "1" for t in ("python", "clipline", "apache-beam", "img2dataset", "pyarrow", "imagehash")}
    manifest = {"schema": "manifest", "version": 1, "lineage": {"inputs": [], "querylist": {}}, "params": {},
                "tools": tools, "funnel": {"input_rows": 2 * n_shards + 1, "kept": 2 * n_shards,
                                           "rejected": {"crawl:http_404": 1}, "stages": {}},
                "entry_counts": {"before": {}, "after": {}}, "shards": shards}
    (staging / "manifest.json").write_text(json.dumps(manifest))
    return staging


def test_versions_numbering_resolve_and_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a clipline dataset root"):
        DatasetRoot.open(str(tmp_path / "absent"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        DatasetRoot.open(str(tmp_path / "full"), create=True)
    assert not (tmp_path / "full" / "DATASET.json").exists()
    root = DatasetRoot.open(str(tmp_path / "ds"), create=True)
    assert root.latest() is None and root.versions() == [] and root.next_number() == 1
    with pytest.raises(DatasetError, match="no published version"):
        root.resolve("latest")
    staging = _staging(tmp_path, 2)
    doc = publish(root, 1, staging=str(staging), dataset_section={"version": 1}, version_doc={"as_of": "t"})
    assert doc["samples"] == 4 and doc["shards"] == 2 and doc["bytes"] > 2 * 4096
    assert root.latest() == 1 and root.resolve("v1") == root.resolve("0001") == root.resolve("latest") == 1
    with pytest.raises(DatasetError, match=r"no version '7' \(published: 0001\)"):
        root.resolve("7")
    published = tmp_path / "ds/versions/0001"
    assert json.loads((published / "manifest.json").read_text())["dataset"] == {"version": 1}
    assert sorted(p.name for p in (published / "shards").iterdir()) == [
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "sizes.json"]
    # a directory above LATEST is an aborted build's: never listed, removed by the next build
    (tmp_path / "ds/versions/0002/shards").mkdir(parents=True)
    (tmp_path / "ds/versions/0002/VERSION.json").write_text("{}")
    assert root.versions() == [1] and root.clear_aborted() == [2] and not (tmp_path / "ds/versions/0002").exists()


def test_comparable_manifest_drops_only_timing_activity_and_version():
    doc = {"dataset": {"version": 3}, "funnel": {"kept": 5}, "shards": [{"tar_sha256": "a"}],
           "crawl": {"as_of": "T", "crawl_store": {"fetch": 3}, "rounds": [], "fetch": {}},
           "curate": {"steps": [{"name": "read", "seconds": 1.2, "rows": 4}], "elapsed_s": 3},
           "params": {"crawl": {"max_download_seconds": 3.0}}, "stages": {"crawl": {"params": {"seconds": 1}}}}
    assert comparable_manifest(doc) == {"funnel": {"kept": 5}, "shards": [{"tar_sha256": "a"}],
                                        "crawl": {"as_of": "T"}, "curate": {"steps": [{"name": "read", "rows": 4}]},
                                        "params": {"crawl": {"max_download_seconds": 3.0}},
                                        "stages": {"crawl": {"params": {"seconds": 1}}}}


PUBLISH = """
import sys, time
from pipelines.dataset import versions as V
copy = V.copy_file
def slow(src, dst):
    time.sleep(0.03)
    copy(src, dst)
V.copy_file = slow
root = V.DatasetRoot.open(sys.argv[1])
root.clear_aborted()
n = root.next_number()
V.publish(root, n, staging=sys.argv[2], dataset_section={"version": n}, version_doc={"as_of": "t"})
print("published", n, flush=True)
"""


def test_kill_9_while_publishing_leaves_latest_on_a_complete_version(tmp_path):
    root = DatasetRoot.open(str(tmp_path / "ds"), create=True)
    staging = _staging(tmp_path, 12)
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    started = time.time()
    subprocess.run([sys.executable, "-c", PUBLISH, root.uri, str(staging)], check=True, env=env, cwd=ROOT_DIR,
                   capture_output=True)
    duration = time.time() - started
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for i in range(6):
        before = root.latest()
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH, root.uri, str(staging)], env=env, cwd=ROOT_DIR,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.0, duration)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        latest = root.latest()
        assert latest in (before, before + 1), (seed, i, delay)
        d = Path(root.version_dir(latest))
        assert json.loads((d / "VERSION.json").read_text())["version"] == latest, (seed, i)
        assert all((d / "shards" / f"{k:05d}.{ext}").stat().st_size for k in range(12) for ext in ("tar", "parquet"))
    assert root.versions() == list(range(1, root.latest() + 1))


def test_takedown_files_are_checked_line_by_line_and_nothing_is_written_on_error(tmp_path):
    d = str(tmp_path / "takedowns")
    bad = tmp_path / "urls.txt"
    bad.write_text("# header\nhttp://a.test/1.jpg\n\nftp://a.test/2.jpg\n")
    with pytest.raises(TD.TakedownError, match=r"urls\.txt:4: expected an http\(s\) URL, got 'ftp://a.test/2.jpg'"):
        TD.record(d, "url", str(bad))
    (tmp_path / "uids.txt").write_text(f"{UID}\nxyz\n")
    with pytest.raises(ClipError, match=r"uids\.txt:2: expected a sample uid"):
        TD.record(d, "uid", str(tmp_path / "uids.txt"))
    (tmp_path / "domains.txt").write_text("example.com\nhttp://evil.test/\n")
    with pytest.raises(ClipError, match=r"domains\.txt:2: expected a domain name"):
        TD.record(d, "domain", str(tmp_path / "domains.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ClipError, match="no urls in the file"):
        TD.record(d, "url", str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes(b"http://a.test/\xe9.jpg\n")
    with pytest.raises(ClipError, match=r"latin1\.txt:1: not valid UTF-8"):
        TD.record(d, "url", str(tmp_path / "latin1.txt"))
    with pytest.raises(ClipError, match="no such takedown file"):
        TD.record(d, "url", str(tmp_path / "absent.txt"))
    assert not os.path.exists(d) and not TD.load(d)


def test_takedown_set_matching_and_recording(tmp_path):
    d = str(tmp_path / "takedowns")
    (tmp_path / "u.txt").write_text("http://a.test/1.jpg\n")
    (tmp_path / "d.txt").write_text("Blocked.Test\n")
    (tmp_path / "i.txt").write_text(UID.upper() + "\n")
    for kind, f in (("url", "u.txt"), ("domain", "d.txt"), ("uid", "i.txt")):
        TD.record(d, kind, str(tmp_path / f))
    tds = TD.load(d)
    assert tds.summary()["requests"] == 3 and [r["file"] for r in tds.requests] == [
        "000001-url.json", "000002-domain.json", "000003-uid.json"]
    assert tds.matches("http://a.test/1.jpg") and not tds.matches("http://a.test/2.jpg")
    assert tds.matches("https://cdn.blocked.test:8443/x.jpg") and tds.matches("http://blocked.test/x")
    assert not tds.matches("http://notblocked.test/x") and not tds.matches("http://blocked.test.evil/x")
    assert tds.matches("http://other.test/x", UID) and not tds.matches("http://other.test/x", "f" * 32)
    assert TD.urls_to_delete(tds, [(UID, "http://c.test/1"), ("f" * 32, "http://cdn.blocked.test/2"),
                                   ("e" * 32, "http://fine.test/3")]) == {
        "http://a.test/1.jpg", "http://c.test/1", "http://cdn.blocked.test/2"}
    # column-wise, row for row, as the crawl store stage asks (odd URLs, repeated URLs, nulls never occur)
    urls = ["http://a.test/1.jpg", "http://a.test/2.jpg", "https://cdn.blocked.test:8443/x.jpg",
            "http://blocked.test/x", "http://notblocked.test/x", "http://blocked.test.evil/x", "http://other.test/x",
            "http://other.test/x", "http://BLOCKED.test/y", "not a url", "", "http://[::1]:80/blocked.test",
            "http://a.test/1.jpg", "http:/\t/blocked.test/x", " http://blocked.test/x", "http://blocked.test\t/x",
            "http://x@blocked.test/1", "http://blocked.test:99999/2", "http://[blocked.test/3", "//blocked.test/4",
            "http://blocked.test?x", "http://blocked.test#f", "HTTP://WWW.BLOCKED.TEST./5", "\x01http://blocked.test/6"]
    uids = [UID, "f" * 32, "e" * 32, "d" * 32, "c" * 32, "b" * 32, UID, "a" * 32, "9" * 32, UID.upper(), "8" * 32,
            "7" * 32, "6" * 32]
    uids += ["5" * 32] * (len(urls) - len(uids))
    mask = TD.blocked_mask(tds, pa.array(uids), pa.array(urls)).to_pylist()
    assert mask == [tds.matches(u, i) for u, i in zip(urls, uids)] and 8 < sum(mask) < len(urls)
    assert TD.blocked_mask(TD.TakedownSet(), pa.array(uids), pa.array(urls)).to_pylist() == [False] * len(urls)
    fp = tds.fingerprint()
    TD.record(d, "url", str(tmp_path / "u.txt"))  # the same request again: same set, same fingerprint
    assert TD.load(d).fingerprint() == fp


def test_diff_reasons():
    assert removed_reason(("crawl", "takedown")) == "takedown"
    assert removed_reason(("crawl", "http_404")) == "now failing"
    assert removed_reason(("balance", "not_sampled")) == "rebalanced out"
    assert removed_reason(("decontam", "eval_overlap:cifar10")) == "newly contaminated"
    assert removed_reason(("curate", "duplicate_url")) == "curation: duplicate_url"
    assert removed_reason(None) == "input removed"
    assert added_reason(None) == "new input" and added_reason(("crawl", "timeout_headers")) == "now fetched"
    assert added_reason(("balance", "not_sampled")) == "rebalanced in"
    assert added_reason(("decontam", "eval_overlap:x")) == "no longer contaminated"


def test_cli_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
    root = DatasetRoot.open(str(tmp_path / "ds"), create=True)
    publish(root, 1, staging=str(_staging(tmp_path, 1)), dataset_section={}, version_doc={"as_of": "t"})
    (tmp_path / "bad.txt").write_text("http://a.test/1.jpg\nnot-a-url\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    before = sorted(p for p in (tmp_path / "ds").rglob("*"))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli_versions", *args], capture_output=True, text=True,
                              env=env, cwd=ROOT_DIR)

    cases = [(("versions", str(tmp_path)), "not a clipline dataset root"),
             (("diff", str(tmp_path / "ds"), "1", "9"), "no version '9' (published: 0001)"),
             (("takedown", str(tmp_path / "ds"), "--urls", str(tmp_path / "bad.txt")),
              "bad.txt:2: expected an http(s) URL"),
             (("takedown", str(tmp_path / "ds")), "give exactly one of")]
    for args, message in cases:
        res = cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, res.stderr)
    assert sorted(p for p in (tmp_path / "ds").rglob("*")) == before
    ok = cli("versions", str(tmp_path / "ds"), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["version"] == 1


def test_root_store_and_publish_on_s3(s3_bucket, tmp_path):
    """The same code on s3:// (moto): a root, a published version with LATEST, the crawl store and a takedown."""
    from pipelines.core import storage
    from pipelines.dataset.crawl_store import CrawlStore, FetchResult

    uri = f"{s3_bucket}/datasets/demo"
    root = DatasetRoot.open(uri, create=True)
    staging = _staging(tmp_path, 2)
    s3_staging = f"{uri}/work/build"
    for p in staging.rglob("*"):
        if p.is_file():
            storage.write_file_atomic(f"{s3_staging}/{p.relative_to(staging)}", str(p))
    doc = publish(root, 1, staging=s3_staging, dataset_section={"version": 1}, version_doc={"as_of": "t"})
    assert root.latest() == 1 and root.versions() == [1] and doc["shards"] == 2
    assert storage.read_bytes(f"{uri}/versions/0001/shards/00001.tar") == (staging / "shards/00001.tar").read_bytes()
    with pytest.raises(DatasetError, match="not empty"):
        DatasetRoot.open(f"{s3_bucket}/datasets", create=True)

    store = CrawlStore.open(root.crawl_store)
    store.record([FetchResult("http://a.test/1.jpg", "ok", data=b"A" * 700),
                  FetchResult("http://a.test/2.jpg", "ok", data=b"B" * 700),
                  FetchResult("http://a.test/3.jpg", "failed", reason="http_404")], "2025-03-01")
    store = CrawlStore.open(root.crawl_store)
    assert store.read_image(store.get("http://a.test/2.jpg")) == b"B" * 700
    (tmp_path / "td.txt").write_text("http://a.test/1.jpg\n")
    done = TD.request(uri, "url", str(tmp_path / "td.txt"))
    assert done["bytes_deleted"] == 1
    packs = b"".join(storage.read_bytes(u) for u in storage.list_prefix(f"{root.crawl_store}/packs"))
    assert b"A" * 700 not in packs and b"B" * 700 in packs
    assert CrawlStore.open(root.crawl_store).plan(["http://a.test/3.jpg"], "2025-03-02").failed


def test_build_dataset_version_argument_errors(tmp_path, capsys):
    """`clipline build --dataset ROOT ...` (flows.cli_versions.build_dataset_version): misuse is exit 2, one line."""
    import typer

    from flows.cli_versions import build_dataset_version

    cases = [(dict(flags={"out": "x"}), "--out/--work cannot be used with --dataset"),
             (dict(flags={"inputs": ["a"]}, rebuild_latest=True), "--rebuild-latest takes the latest version's"),
             (dict(flags={}, as_of="last tuesday"), "--as-of: 'last tuesday' is not a time"),
             (dict(flags={}, rebuild_latest=True), "not a clipline dataset root")]
    for kw, message in cases:
        with pytest.raises(typer.Exit) as exc:
            build_dataset_version(str(tmp_path / "ds"), None, **kw)
        assert exc.value.exit_code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (kw, err)
    assert not (tmp_path / "ds").exists()


def test_a_build_with_a_bad_config_or_clock_writes_nothing(tmp_path):
    """build_version checks inputs, query list and as_of before it creates a root (the flow's function itself)."""
    from flows.versions import build_version

    (tmp_path / "list.parquet").write_bytes(b"not parquet at all")
    root = tmp_path / "ds"
    for config, as_of, message in (
            ({"inputs": [str(tmp_path / "absent.parquet")], "querylist": str(tmp_path / "q.txt")}, None,
             "absent.parquet"),
            ({"inputs": [str(tmp_path / "list.parquet")], "querylist": str(tmp_path / "q.txt")}, "soon",
             "is not a time")):
        with pytest.raises(ClipError, match=message):
            build_version.fn(str(root), config, as_of=as_of)
        assert not root.exists()
    with pytest.raises(ClipError, match="not a clipline dataset root"):
        build_version.fn(str(root), None, rebuild_latest=True)
    assert not root.exists()
