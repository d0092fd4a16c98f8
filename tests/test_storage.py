"""Storage layer: local paths and s3:// against moto's real S3 server on 127.0.0.1 (and a faulty proxy)."""
from __future__ import annotations

import hashlib
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core import storage
from pipelines.core.storage import StorageError
from tests.s3_fixtures import faulty_s3_endpoint, s3_bucket, s3_endpoint  # noqa: F401 - fixtures


def test_expand_braces_ranges_and_lists():
    assert storage.expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert storage.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert storage.expand_braces("plain.tar") == ["plain.tar"]


def test_join_basename_parent():
    assert storage.join("s3://b/p/", "x", "/y.tar") == "s3://b/p/x/y.tar"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.basename("s3://b/p/x.tar") == "x.tar"
    assert storage.parent("s3://b/p/x.tar") == "s3://b/p"
    assert storage.split_s3("s3://bucket/k/e/y") == ("bucket", "k/e/y")


def test_local_roundtrip_atomic_and_listing(tmp_path):
    d = str(tmp_path / "sub")
    for i in range(3):
        storage.write_bytes_atomic(storage.join(d, f"{i:05d}.tar"), f"shard{i}".encode())
    storage.write_bytes_atomic(storage.join(d, "x.json"), b"{}")
    # no temp files left behind
    assert sorted(os.listdir(d)) == ["00000.tar", "00001.tar", "00002.tar", "x.json"]
    assert storage.expand([f"{d}/{{00000..00002}}.tar"]) == [f"{d}/0000{i}.tar" for i in range(3)]
    assert storage.expand([f"{d}/*.tar", f"{d}/00001.tar"]) == [f"{d}/0000{i}.tar" for i in range(3)]
    assert storage.read_bytes(f"{d}/00001.tar") == b"shard1"
    assert storage.sha256_of(f"{d}/00001.tar") == hashlib.sha256(b"shard1").hexdigest()
    assert storage.list_prefix(d) == sorted(storage.expand([f"{d}/*"]))
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3000))
    storage.write_file_atomic(f"{d}/big.bin", str(src))
    assert storage.read_bytes(f"{d}/big.bin") == src.read_bytes()
    storage.delete(f"{d}/big.bin")
    storage.delete(f"{d}/big.bin")  # idempotent
    assert not storage.exists(f"{d}/big.bin")


def test_local_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"

    class Boom(Exception):
        pass

    def fill(f):
        f.write(b"half")
        raise Boom

    with pytest.raises(Boom):
        storage._local_atomic(str(target), fill)
    assert list(tmp_path.iterdir()) == []


def test_local_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.tar")
    with pytest.raises(StorageError, match="nope.tar: no such file"):
        storage.read_bytes(missing)
    with pytest.raises(StorageError, match="nope.tar: does not exist"):
        storage.expand([missing])
    with pytest.raises(StorageError, match=r"\*.zip: matches no file"):
        storage.expand([str(tmp_path / "*.zip")])
    assert storage.expand([str(tmp_path / "*.zip")], missing_ok=True) == []
    with pytest.raises(StorageError, match="no such directory"):
        storage.list_prefix(str(tmp_path / "nodir"))


def test_s3_roundtrip_listing_and_parquet(s3_bucket):
    base = f"{s3_bucket}/build/shards"
    for i in range(3):
        storage.write_bytes_atomic(f"{base}/{i:05d}.tar", f"shard{i}".encode() * 100)
    storage.write_bytes_atomic(f"{base}/sub/deep.txt", b"deep")
    assert storage.expand([f"{base}/{{00000..00002}}.tar"]) == [f"{base}/0000{i}.tar" for i in range(3)]
    # '*' stays inside one path segment, '**' crosses them
    assert storage.expand([f"{base}/*.t*"]) == [f"{base}/0000{i}.tar" for i in range(3)]
    assert storage.expand([f"{base}/**/*.txt"]) == [f"{base}/sub/deep.txt"]
    assert storage.list_prefix(base) == [f"{base}/0000{i}.tar" for i in range(3)] + [f"{base}/sub/deep.txt"]
    assert storage.list_prefix(f"{s3_bucket}/build/sha") == []  # a prefix, not a string prefix
    assert storage.read_bytes(f"{base}/00002.tar") == b"shard2" * 100
    assert storage.exists(f"{base}/00002.tar") and not storage.exists(f"{base}/00009.tar")
    assert storage.sha256_of(f"{base}/00000.tar") == hashlib.sha256(b"shard0" * 100).hexdigest()

    # pyarrow reads Parquet straight from the seekable stream
    table = pa.table({"uid": [f"u{i}" for i in range(50)], "x": list(range(50))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(f"{base}/00000.parquet", sink.getvalue().to_pybytes())
    with storage.open_read(f"{base}/00000.parquet") as f:
        assert pq.read_table(f).equals(table)

    storage.delete(f"{base}/00000.tar")
    assert not storage.exists(f"{base}/00000.tar")


def test_s3_upload_file_and_seek(s3_bucket, tmp_path):
    data = random.Random(0).randbytes(200_000)
    src = tmp_path / "shard.tar"
    src.write_bytes(data)
    uri = f"{s3_bucket}/p/shard.tar"
    storage.write_file_atomic(uri, str(src))
    with storage.open_read(uri, buffer_size=4096) as f:
        f.seek(150_000)
        assert f.read(10) == data[150_000:150_010]
        f.seek(-5, os.SEEK_END)
        assert f.read() == data[-5:]
        f.seek(0)
        assert f.read() == data


def test_s3_errors_name_the_uri(s3_bucket, s3_endpoint):
    with pytest.raises(StorageError, match=f"{s3_bucket}/missing.tar: no such object"):
        storage.read_bytes(f"{s3_bucket}/missing.tar")
    with pytest.raises(StorageError, match="s3://no-such-bucket-xyz/a: no such bucket"):
        storage.write_bytes_atomic("s3://no-such-bucket-xyz/a", b"x")
    with pytest.raises(StorageError, match="no such bucket"):
        storage.list_prefix("s3://no-such-bucket-xyz/p")
    with pytest.raises(StorageError, match="does not exist"):
        storage.expand([f"{s3_bucket}/{{00000..00001}}.tar"])


def test_explicit_endpoint_setting(s3_endpoint, monkeypatch):
    # Without AWS_ENDPOINT_URL, the explicit setting alone reaches the server.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.set_endpoint_url(s3_endpoint)
    try:
        bucket = "explicit-endpoint"
        storage.s3_client().create_bucket(Bucket=bucket)
        storage.write_bytes_atomic(f"s3://{bucket}/k", b"v")
        assert storage.read_bytes(f"s3://{bucket}/k") == b"v"
    finally:
        storage.set_endpoint_url(None)


def test_transient_faults_give_identical_bytes(faulty_s3_endpoint, monkeypatch, tmp_path):
    """One request in ten fails (500, SlowDown, dropped connection, body cut mid-stream); results are exact."""
    from tests.s3_fixtures import make_bucket

    bucket = make_bucket()  # created directly on moto
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_s3_endpoint.url)
    rng = random.Random(7)
    files = {f"{bucket}/f/{i:05d}.bin": rng.randbytes(rng.randint(1, 300_000)) for i in range(25)}
    for uri, data in files.items():
        storage.write_bytes_atomic(uri, data)
    big = tmp_path / "big.bin"
    big.write_bytes(rng.randbytes(500_000))
    storage.write_file_atomic(f"{bucket}/f/big.bin", str(big))
    files[f"{bucket}/f/big.bin"] = big.read_bytes()

    assert storage.list_prefix(f"{bucket}/f") == sorted(files)
    for uri, data in files.items():
        assert storage.read_bytes(uri) == data
        assert storage.sha256_of(uri) == hashlib.sha256(data).hexdigest()
    # every fault kind really happened
    assert faulty_s3_endpoint.requests >= 60
    assert all(n >= 1 for n in faulty_s3_endpoint.faults.values()), faulty_s3_endpoint.faults
    assert set(faulty_s3_endpoint.effects) == {"InternalError", "SlowDown", "dropped", "truncated"}, \
        faulty_s3_endpoint.effects


def test_copy_local_links_and_replaces_whole(tmp_path):
    src, dst = tmp_path / "a" / "x.bin", tmp_path / "b" / "c" / "x.bin"
    storage.write_bytes_atomic(str(src), b"v1")
    storage.write_bytes_atomic(str(dst), b"old")
    storage.copy(str(src), str(dst))
    assert dst.read_bytes() == b"v1" and os.stat(src).st_ino == os.stat(dst).st_ino  # a link: no bytes copied
    assert sorted(p.name for p in dst.parent.iterdir()) == ["x.bin"]  # no temporary left behind


def test_copy_between_s3_and_local(s3_bucket, tmp_path):
    storage.write_bytes_atomic(f"{s3_bucket}/c/a.bin", b"abc")
    storage.copy(f"{s3_bucket}/c/a.bin", f"{s3_bucket}/d/a.bin")  # server side
    storage.copy(f"{s3_bucket}/d/a.bin", str(tmp_path / "a.bin"))
    storage.copy(str(tmp_path / "a.bin"), f"{s3_bucket}/e/a.bin")
    assert storage.read_bytes(f"{s3_bucket}/e/a.bin") == b"abc"
    with pytest.raises(StorageError, match=f"{s3_bucket}/missing.bin"):
        storage.copy(f"{s3_bucket}/missing.bin", f"{s3_bucket}/f/a.bin")


def test_sha256_of_sees_a_rewritten_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 100)
    first = storage.sha256_of(str(p))
    assert storage.sha256_of(str(p)) == first  # remembered
    storage.write_bytes_atomic(str(p), b"b" * 100)  # same size, new inode
    assert storage.sha256_of(str(p)) != first
    with open(p, "r+b") as f:  # in place: same inode and size, new modification time
        f.write(b"c")
    os.utime(p, ns=(1, 2))
    assert storage.sha256_of(str(p)) == __import__("hashlib").sha256(p.read_bytes()).hexdigest()
