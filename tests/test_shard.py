"""Resharder: deterministic webdataset shards + Parquet + sizes.json from a real crawl, locally and on S3 (moto)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from pipelines.core import storage
from pipelines.core.stage import MARKER
from pipelines.images.stage import pool_files, read_rows
from pipelines.shard.writer import ShardError, order_key, write_manifest, write_shards
from schemas.manifest import ManifestError
from tests.s3_fixtures import faulty_s3_endpoint, make_bucket, s3_bucket, s3_endpoint  # noqa: F401 - fixtures
from tests.test_images import crawl_build, pool_build  # noqa: F401 - session fixtures

pytestmark = pytest.mark.slow  # the session fixtures run img2dataset and the images pipeline once
SPS = 4
SEED = 5


@pytest.fixture(scope="module")
def kept(pool_build):
    build, stats, _rows = pool_build
    return sorted(r["uid"] for r in read_rows(stats.outputs["pool"]) if r["status"] == "ok")


@pytest.fixture(scope="module")
def local_shards(pool_build, kept, tmp_path_factory):
    build, _stats, _rows = pool_build
    dest = str(tmp_path_factory.mktemp("dest") / "shards")
    return dest, write_shards(storage.join(build, "pool"), kept, dest, samples_per_shard=SPS, seed=SEED)


def _files(dest):
    # markers (the stage's and the per-shard ones in _done/) name where the files are, which differs between
    # destinations; every data file must match
    return {storage.basename(u): storage.read_bytes(u) for u in storage.list_prefix(dest)
            if "/_done/" not in u and storage.basename(u) != MARKER}


def test_layout_order_and_sizes(local_shards, kept, pool_build):
    dest, shards = local_shards
    n = len(kept)
    assert [s["name"] for s in shards] == [f"{i:05d}.tar" for i in range(len(shards))]
    assert [s["n"] for s in shards] == [SPS] * (n // SPS) + ([n % SPS] if n % SPS else [])
    sizes = json.loads(storage.read_bytes(f"{dest}/sizes.json"))
    assert sizes == {s["name"]: s["n"] for s in shards}
    pool = {r["uid"]: r for r in read_rows(pool_files(storage.join(pool_build[0], "pool")))}
    order = []
    for s in shards:
        with tarfile.open(f"{dest}/{s['name']}") as tar:
            members = tar.getmembers()
            assert all((m.mtime, m.uid, m.gid, m.uname, m.mode) == (0, 0, 0, "", 0o444) for m in members)
            names = [m.name for m in members]
            keys = list(dict.fromkeys(n.split(".")[0] for n in names))
            assert names == [f"{k}.{e}" for k in keys for e in ("jpg", "json", "txt")]
            for k in keys:
                assert hashlib.sha256(tar.extractfile(f"{k}.jpg").read()).hexdigest() == pool[k]["sha256"]
            order.extend(keys)
        parquet = read_rows([f"{dest}/{s['name'][:-4]}.parquet"])
        assert [r["key"] for r in parquet] == keys
        assert storage.sha256_of(f"{dest}/{s['name']}") == s["tar_sha256"]
    # every kept uid exactly once, in seeded-hash order (not arrival or uid order)
    assert sorted(order) == kept
    assert order == sorted(kept, key=lambda u: order_key(SEED, u))


def test_webdataset_reads_the_shards(local_shards, kept):
    import webdataset as wds

    dest, shards = local_shards
    pattern = f"{dest}/{{00000..{len(shards) - 1:05d}}}.tar"  # the way open_clip's --train-data names them
    seen = []
    for sample in wds.WebDataset(pattern, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert {"uid", "url", "caption", "entry_ids"} <= set(meta)
        assert sample["txt"] == meta["caption"]
        assert sample["jpg"].size[0] > 0
        seen.append(meta["uid"])
    assert sorted(seen) == kept


def test_rerun_skips_and_repairs(local_shards, pool_build, kept):
    dest, shards = local_shards
    pool_dir = storage.join(pool_build[0], "pool")
    before = _files(dest)
    mtimes = {n: os.stat(f"{dest}/{n}").st_mtime_ns for n in before if n.endswith(".tar")}
    again = write_shards(pool_dir, kept, dest, samples_per_shard=SPS, seed=SEED)
    assert again == shards
    assert {n: os.stat(f"{dest}/{n}").st_mtime_ns for n in mtimes} == mtimes  # finished shards not rewritten
    # a damaged shard (as if a non-atomic writer had died) is detected by its hash and rebuilt
    with open(f"{dest}/00001.tar", "r+b") as f:
        f.truncate(100)
    write_shards(pool_dir, kept, dest, samples_per_shard=SPS, seed=SEED)
    assert _files(dest) == before


def test_same_input_same_bytes_and_seed_changes_order(local_shards, pool_build, kept, tmp_path):
    dest, _ = local_shards
    pool_dir = storage.join(pool_build[0], "pool")
    write_shards(pool_dir, kept, str(tmp_path / "again"), samples_per_shard=SPS, seed=SEED)
    assert _files(str(tmp_path / "again")) == _files(dest)
    other = write_shards(pool_dir, kept, str(tmp_path / "other"), samples_per_shard=SPS, seed=SEED + 1)
    assert _files(str(tmp_path / "other"))["00000.tar"] != _files(dest)["00000.tar"]
    # fewer shards than before: stale higher-numbered shards are removed
    write_shards(pool_dir, kept[:3], str(tmp_path / "other"), samples_per_shard=SPS, seed=SEED + 1)
    assert sorted(n for n in _files(str(tmp_path / "other")) if n.endswith(".tar")) == ["00000.tar"]
    assert len(other) > 1


def test_kept_uid_not_in_pool_is_an_error(pool_build, tmp_path):
    with pytest.raises(ShardError, match="not ok rows of the pool"):
        write_shards(storage.join(pool_build[0], "pool"), ["f" * 32], str(tmp_path / "x"), samples_per_shard=2)


def test_s3_destination_through_faulty_endpoint_gives_same_bytes(local_shards, pool_build, kept, faulty_s3_endpoint,
                                                                 s3_endpoint, monkeypatch):
    dest, shards = local_shards
    bucket = make_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_s3_endpoint.url)  # every 10th request fails
    s3_dest = f"{bucket}/build/shards"
    s3_shards = write_shards(storage.join(pool_build[0], "pool"), kept, s3_dest, samples_per_shard=SPS, seed=SEED)
    assert s3_shards == shards
    assert _files(s3_dest) == _files(dest)
    assert sum(faulty_s3_endpoint.faults.values()) >= 1
    import webdataset as wds

    # read back as a trainer would: webdataset over 'pipe:' URLs (open_clip's way to stream s3:// shards)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    urls = storage.expand([f"{s3_dest}/{{00000..{len(shards) - 1:05d}}}.tar"])
    n = sum(1 for _ in wds.WebDataset([f"pipe:{_cat_cmd(u)}" for u in urls], shardshuffle=False))
    assert n == len(kept)


def _cat_cmd(uri: str) -> str:
    # webdataset opens s3 shards through a pipe; our storage layer is the reader
    return (f"{sys.executable} -c \"import sys; from pipelines.core import storage; "
            f"sys.stdout.buffer.write(storage.read_bytes('{uri}'))\"")


def test_manifest_is_validated(tmp_path):
    good = {"lineage": {"inputs": [{"uri": "a.parquet", "sha256": "00"}], "querylist": {"uri": "q", "sha256": "1"}},
            "params": {"seed": 0}, "funnel": {"input_rows": 3, "kept": 2, "rejected": {"crawl:404": 1}},
            "entry_counts": {"before": {"1": 3}, "after": {"1": 2}},
            "shards": [{"name": "00000.tar", "n": 2}], "samples_per_shard": 2}
    doc = write_manifest(str(tmp_path / "manifest.json"), good)
    assert json.loads((tmp_path / "manifest.json").read_text()) == doc
    assert {"python", "apache-beam", "img2dataset", "pyarrow", "imagehash", "clipline"} <= set(doc["tools"])
    bad = dict(good, funnel={"input_rows": 4, "kept": 2, "rejected": {"crawl:404": 1}})
    with pytest.raises(ManifestError, match="does not add up"):
        write_manifest(str(tmp_path / "bad.json"), bad)
    assert not (tmp_path / "bad.json").exists()
