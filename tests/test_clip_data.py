"""Shard streaming for training: shard specs (dir, brace, glob, s3:// on moto's server), seeded batches, resume
skipping, and bad samples skipped with a reason."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clip_train.data import StreamConfig, epoch_loader, iter_captions, resolve_shards
from clip_train.errors import DataError
from clip_train.shards import synthetic_shape_samples, write_shards
from clip_train.tokenizer import CLIPTokenizer
from clip_train.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(synthetic_shape_samples(96, seed=3), out, samples_per_shard=24)
    return out


@pytest.fixture(scope="module")
def tokenizer(shard_dir):
    return CLIPTokenizer.train(iter_captions(resolve_shards(str(shard_dir)).urls, 1000), vocab_size=600)


def _batches(urls, tokenizer, epoch=0, skip=0, workers=0, steps=4, seed=0, resample=True):
    cfg = StreamConfig(urls=urls, batch_size=8, image_size=32, steps_per_epoch=steps, seed=seed, resample=resample, shuffle_buffer=50, shuffle_initial=10)
    # Each batch is (images, tokens, stats); the tests compare images and tokens.
    return [(b[0], b[1]) for b in epoch_loader(cfg, tokenizer, epoch, rank=0, world=1, workers=workers, skip_batches=skip)]


def _stats(urls, tokenizer, steps=3, workers=0):
    cfg = StreamConfig(urls=urls, batch_size=8, image_size=32, steps_per_epoch=steps, shuffle_buffer=50, shuffle_initial=10)
    return [b[2] for b in epoch_loader(cfg, tokenizer, 0, rank=0, world=1, workers=workers)]


def test_resolve_dir_brace_glob(shard_dir):
    by_dir = resolve_shards(str(shard_dir))
    assert [p.rsplit("/", 1)[1] for p in by_dir.urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert by_dir.num_samples == 96
    brace = resolve_shards(f"{shard_dir}/{{00000..00001}}.tar")
    assert brace.urls == by_dir.urls[:2] and brace.num_samples == 48
    assert resolve_shards(f"{shard_dir}/*.tar").urls == by_dir.urls
    with pytest.raises(DataError, match="6 of 10 shards.*00004.tar"):
        resolve_shards(f"{shard_dir}/{{00000..00009}}.tar")
    with pytest.raises(DataError, match="matches no files"):
        resolve_shards(f"{shard_dir}/*.tgz")
    with pytest.raises(DataError, match="holds no"):
        resolve_shards(str(shard_dir.parent))


def test_batches_are_seeded_and_resume_skips_exactly(shard_dir, tokenizer):
    urls = resolve_shards(str(shard_dir)).urls
    first = _batches(urls, tokenizer)
    again = _batches(urls, tokenizer)
    assert len(first) == 4
    images, texts = first[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and texts.shape[0] == 8 and texts.shape[1] < 77
    assert ((texts == tokenizer.eot_token_id).sum(dim=1) == 1).all() and (texts[:, -1] != 0).any()
    for (a, b), (c, d) in zip(first, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    resumed = _batches(urls, tokenizer, skip=2)
    assert len(resumed) == 2
    for (a, b), (c, d) in zip(first[2:], resumed):
        assert torch.equal(a, c) and torch.equal(b, d)
    other_epoch = _batches(urls, tokenizer, epoch=1)
    assert not torch.equal(other_epoch[0][1], first[0][1])


def test_two_workers_and_shard_passes_without_resampling(shard_dir, tokenizer):
    urls = resolve_shards(str(shard_dir)).urls
    batches = _batches(urls, tokenizer, workers=2, steps=6, resample=False)
    assert len(batches) == 6
    # Each pass over the shards sees each sample once: 12 batches x 8 = 96 = one pass over the 4 shards.
    two_passes = _batches(urls, tokenizer, steps=12, resample=False)
    decoded = [tokenizer.decode(t) for _, texts in two_passes for t in texts]
    assert len(decoded) == 96
    with pytest.raises(DataError, match="cannot be split"):
        _batches(urls[:1], tokenizer, workers=2, resample=False)


def test_bad_samples_are_skipped_with_reason(tmp_path, tokenizer, capsys):
    good = synthetic_shape_samples(20, seed=5)
    write_shards(good, tmp_path, samples_per_shard=20)
    # Append a corrupt image and a sample without caption to the shard.
    shard = tmp_path / "00000.tar"
    truncated = good[1].jpeg[: len(good[1].jpeg) // 2]
    members = (("zbad.jpg", b"not a jpeg"), ("zbad.txt", b"caption"), ("znocap.jpg", good[0].jpeg),
               ("ztrunc.jpg", truncated), ("ztrunc.txt", b"half an image"))
    with tarfile.open(shard, "a") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    batches = _batches([str(shard)], tokenizer, steps=3)
    assert len(batches) == 3
    err = capsys.readouterr().err
    assert "unreadable image header" in err and "zbad" in err
    assert "undecodable image" in err and "ztrunc" in err
    assert "lacks an image or a .txt caption" in err and "znocap" in err
    # The same counts travel with the batches (to metrics.jsonl), summed over the epoch by reason.
    totals = {}
    for stats in _stats([str(shard)], tokenizer, steps=3):
        for reason, n in stats["skipped"].items():
            totals[reason] = totals.get(reason, 0) + n
    # (with resampling the shard may be read more than once, so each bad sample counts once per read)
    assert set(totals) == {"unreadable image header", "undecodable image", "sample lacks an image or a .txt caption"}
    assert all(n >= 1 for n in totals.values())
    # Samples rejected by the header/caption checks do not break exact resumption.
    bad_header_only = tmp_path / "header_only"
    write_shards(good, bad_header_only, samples_per_shard=20)
    with tarfile.open(bad_header_only / "00000.tar", "a") as tar:
        for name, data in members[:3]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    full = _batches([str(bad_header_only / "00000.tar")], tokenizer, steps=3)
    resumed = _batches([str(bad_header_only / "00000.tar")], tokenizer, steps=3, skip=2)
    assert torch.equal(full[2][0], resumed[0][0]) and torch.equal(full[2][1], resumed[0][1])


def test_transforms_normalise_and_crop():
    image = Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8))
    out = EvalTransform(32)(image)
    assert out.shape == (3, 32, 32)
    expected = (128 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)
    train = TrainTransform(32, scale=(0.5, 1.0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        left, top, right, bottom = train.crop_box(60, 40, rng)
        assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
        area = (right - left) * (bottom - top) / (60 * 40)
        assert 0.45 <= area <= 1.0
    assert train(image, rng).shape == (3, 32, 32)


@pytest.fixture()
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_shards_stream_like_local(shard_dir, tokenizer, s3_endpoint):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="data")
    for path in sorted(shard_dir.iterdir()):
        s3.upload_file(str(path), "data", f"shards/{path.name}")
    brace = resolve_shards("s3://data/shards/{00000..00003}.tar")
    listed = resolve_shards("s3://data/shards/")
    assert brace.urls == listed.urls == [f"s3://data/shards/{i:05d}.tar" for i in range(4)]
    assert brace.num_samples == 96
    local = _batches(resolve_shards(str(shard_dir)).urls, tokenizer)
    remote = _batches(brace.urls, tokenizer)
    for (a, b), (c, d) in zip(local, remote):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_run_directory_on_s3(shard_dir, s3_endpoint):
    """The trainer writes its run directory through pipelines.core.storage: an s3:// --out works like a local one,
    and the run loads back from S3 for evaluation (and resumes from there)."""
    import boto3

    from clip_train import train
    from clip_train.interop import load_any

    boto3.client("s3").create_bucket(Bucket="runs")
    threads = torch.get_num_threads()
    argv = ["--data", str(shard_dir), "--model", "tiny", "--out", "s3://runs/r1", "--batch-size", "8", "--steps", "3",
            "--workers", "0", "--threads", "1", "--device", "cpu", "--vocab-size", "600", "--save-every", "2"]
    try:
        assert train.main([*argv, "--stop-at", "2"]) == 0
        assert train.main([*argv, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="runs")["Contents"]}
    assert {"r1/checkpoint.pt", "r1/config.json", "r1/tokenizer.json", "r1/metrics.jsonl"} <= keys
    body = boto3.client("s3").get_object(Bucket="runs", Key="r1/metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line)["step"] for line in body.splitlines()] == [1, 2, 3]
    loaded = load_any("s3://runs/r1")
    assert loaded.format == "clipline-run" and loaded.info["step"] == 3
