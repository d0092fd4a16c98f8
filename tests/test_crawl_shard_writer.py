"""The crawl's shard writer: samples written in arrival order are published in key order, with the image offsets
of the published tar in the Parquet rows; the published tar is the one a writer given the samples in key order
would have written."""
from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.crawl.worker import EXTRA_FIELDS, CrawlShardWriter

SCHEMA = pa.schema([pa.field("uid", pa.string()), pa.field("key", pa.string()), pa.field("status", pa.string()),
                    *EXTRA_FIELDS])


def _meta(key: str, ok: bool) -> dict:
    meta = {f.name: None for f in SCHEMA}
    meta.update(uid=f"uid-{key}", key=key, status="success" if ok else "failed_to_download")
    return meta


def _write(folder, keys) -> CrawlShardWriter:
    writer = CrawlShardWriter(3, str(folder), True, 5, SCHEMA, "jpg")
    for key in keys:
        ok = int(key) % 4 != 1  # some samples without an image: a Parquet row, no tar member
        image = (f"image of {key} " * (int(key) + 1)).encode() if ok else None
        writer.write(image, key, f"caption {key}", _meta(key, ok))
    writer.close()
    return writer


def test_shards_are_published_in_key_order_with_offsets_into_the_published_tar(tmp_path):
    keys = [f"{i:09d}" for i in range(12)]
    arrival = [keys[i] for i in (5, 0, 11, 3, 1, 7, 2, 10, 4, 9, 6, 8)]
    writer = _write(tmp_path / "staged", arrival)
    out_tar, out_pq = tmp_path / "pub" / "00003.tar", tmp_path / "pub" / "00003.parquet"
    writer.publish(str(out_tar), str(out_pq))

    with tarfile.open(out_tar) as tar:
        names = tar.getnames()
    with_image = [k for k in keys if int(k) % 4 != 1]
    assert names == [f"{k}.{ext}" for k in with_image for ext in ("jpg", "json", "txt")]
    rows = pq.read_table(out_pq).to_pylist()
    assert [r["key"] for r in rows] == keys
    data = out_tar.read_bytes()
    for r in rows:
        if int(r["key"]) % 4 == 1:
            assert r["jpg_offset"] is None and r["jpg_size"] is None
        else:
            image = data[r["jpg_offset"]:r["jpg_offset"] + r["jpg_size"]]
            assert image == (f"image of {r['key']} " * (int(r["key"]) + 1)).encode()

    # the same bytes as a writer that got the samples in key order, and no trace of the arrival order
    direct = _write(tmp_path / "direct", keys)
    direct.publish(str(tmp_path / "direct.tar"), str(tmp_path / "direct.parquet"))
    assert (tmp_path / "direct.tar").read_bytes() == data
    assert pq.read_table(tmp_path / "direct.parquet").equals(pq.read_table(out_pq))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # a well-formed tar to its end
        assert len(tar.getmembers()) == 3 * len(with_image)


def test_a_shard_without_any_image_is_an_empty_tar(tmp_path):
    writer = _write(tmp_path / "staged", ["000000001", "000000005"])
    writer.publish(str(tmp_path / "t.tar"), str(tmp_path / "t.parquet"))
    with tarfile.open(tmp_path / "t.tar") as tar:
        assert tar.getnames() == []
    assert pq.read_table(tmp_path / "t.parquet").column("key").to_pylist() == ["000000001", "000000005"]
