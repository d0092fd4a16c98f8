"""Streaming webdataset shards (local paths or s3://) into (image, token) batches for CLIP training.

Shard specs: a directory holding `NNNNN.tar` (+ `sizes.json`), a brace pattern (`DIR/{00000..00009}.tar`), a glob
(`DIR/*.tar`), or the same under `s3://bucket/prefix/` (read with boto3, which takes its endpoint from
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3). Several specs can be joined with `::`.

The stream is built from webdataset's tar iterators and shuffle buffer. An epoch is `samples_per_epoch` samples,
i.e. `steps_per_epoch` global batches. Everything random is derived from (seed, epoch, rank, worker) and the
augmentation generator from (seed, epoch, rank, batch index), so the batch sequence is a function of the seed alone:
a resumed run skips the already-trained batches of its epoch by reading (not decoding) their samples and then sees
exactly the batches an uninterrupted run would have seen. Decoding, augmentation and tokenisation run in the
DataLoader workers; bad samples are skipped with a counted reason, never a crash.
"""

from __future__ import annotations

import glob as globlib
import io
import json
import logging
import math
import os
import random
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from clip_train.transforms import TrainTransform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------------------------------- shard lists
def _is_s3(url: str) -> bool:
    return url.startswith("s3://")


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


_S3_CLIENT = None


def s3_client():
    """One boto3 client per process (DataLoader workers each make their own after fork)."""
    global _S3_CLIENT
    if _S3_CLIENT is None or getattr(_S3_CLIENT, "_clipline_pid", None) != os.getpid():
        import boto3

        _S3_CLIENT = boto3.client("s3")
        _S3_CLIENT._clipline_pid = os.getpid()
    return _S3_CLIENT


def _list_s3_tars(prefix_url: str) -> list[str]:
    bucket, prefix = _split_s3(prefix_url.rstrip("/") + "/")
    urls = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        urls += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
    return sorted(urls)


def _read_sizes(directory: str) -> dict[str, int] | None:
    """sizes.json of a shard directory ({"00000.tar": n, ...}), or None when there is none."""
    if _is_s3(directory):
        bucket, key = _split_s3(directory.rstrip("/") + "/sizes.json")
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # missing object -> no sizes; anything else is reported
            if "NoSuchKey" in type(exc).__name__ or "NoSuchKey" in str(exc) or "404" in str(exc):
                return None
            raise
        source = f"s3://{bucket}/{key}"
    else:
        path = Path(directory) / "sizes.json"
        if not path.exists():
            return None
        body, source = path.read_bytes(), str(path)
    try:
        sizes = json.loads(body)
        if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
            raise ValueError("expected an object of shard name -> sample count")
    except ValueError as exc:
        raise ValueError(f"{source}: invalid sizes.json: {exc}") from exc
    return sizes


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: int | None  # from sizes.json when every shard is listed there


def resolve_shards(spec: str) -> ShardSet:
    """Expand a shard spec into URLs (sorted within each part) and, when sizes.json covers them, the sample count."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if _is_s3(part):
            if part.endswith("/") or not (part.endswith(".tar") or "{" in part):
                urls += _list_s3_tars(part)
            else:
                urls += list(wds.shardlists.expand_urls(part))
            continue
        path = Path(part)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"shard directory {part} holds no *.tar files")
            urls += found
            continue
        expanded = list(wds.shardlists.expand_urls(part))
        missing = []
        for item in expanded:
            if any(ch in item for ch in "*?["):
                matches = sorted(globlib.glob(item))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {item} matches no files")
                urls += matches
            elif not Path(item).exists():
                missing.append(item)
            else:
                urls.append(item)
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(expanded)} shards of {part!r} do not exist, first: {missing[0]}")
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    total = 0
    sizes_cache: dict[str, dict[str, int] | None] = {}
    for url in urls:
        directory, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if directory not in sizes_cache:
            sizes_cache[directory] = _read_sizes(directory)
        sizes = sizes_cache[directory]
        if sizes is None or name not in sizes:
            return ShardSet(urls, None)
        total += sizes[name]
    return ShardSet(urls, total)


def open_shard(url: str):
    if _is_s3(url):
        bucket, key = _split_s3(url)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(url, "rb")


# ------------------------------------------------------------------------------------------------- sample stream
def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class SkipCounter:
    """Counts rejected samples/shards per reason and logs the first few of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.counts[reason] <= 3:
            print(f"clip_train.data: skipped {where}: {reason}", file=sys.stderr)


def shard_stream(urls: list[str], seed: int, resample: bool, rank: int, world: int, worker: int, workers: int) -> Iterator[str]:
    """Infinite shard-URL stream for one (rank, worker).

    resample: shards drawn with replacement from a generator seeded per (rank, worker).
    otherwise: passes over a seeded permutation (identical on all ranks), split by rank then by worker, reshuffled
    every pass.
    """
    if resample:
        rng = random.Random(_seed(seed, rank, worker, 1))
        while True:
            yield urls[rng.randrange(len(urls))]
    slots = world * workers
    if len(urls) < slots:
        raise ValueError(
            f"{len(urls)} shards cannot be split over {world} ranks x {workers} workers without resampling; "
            "use resampling (the default) or fewer workers"
        )
    for pass_index in range(sys.maxsize):
        order = urls.copy()
        random.Random(_seed(seed, pass_index, 2)).shuffle(order)
        yield from order[rank::world][worker::workers]


def raw_samples(urls: Iterator[str], skips: SkipCounter) -> Iterator[dict]:
    """Raw {__key__, jpg, txt, ...} dicts from a shard-URL stream, corrupt shards/members skipped."""

    def opened() -> Iterator[dict]:
        failures_in_a_row = 0
        for url in urls:
            try:
                stream = open_shard(url)
            except Exception as exc:  # unreadable shard: skip it, say why
                skips(f"cannot open shard: {exc}", url)
                failures_in_a_row += 1
                if failures_in_a_row >= 50:
                    raise RuntimeError(f"50 shards in a row could not be opened; last: {url}: {exc}") from exc
                continue
            failures_in_a_row = 0
            yield {"url": url, "stream": stream}

    def on_error(exc: Exception) -> bool:
        skips(f"corrupt tar data: {exc.args[0] if exc.args else exc}", "tar member")
        return True

    def guarded(members: Iterator[dict]) -> Iterator[dict]:
        # tar_file_expander ends every shard with {}; a stream of shards that give nothing would loop forever.
        empty_in_a_row, in_shard = 0, 0
        for member in members:
            if member == {}:
                empty_in_a_row = 0 if in_shard else empty_in_a_row + 1
                in_shard = 0
                if empty_in_a_row >= 50:
                    raise RuntimeError(f"50 shards in a row gave no samples; last errors: {skips.counts}")
            else:
                in_shard += 1
            yield member

    yield from group_by_keys(guarded(tar_file_expander(opened(), handler=on_error)), handler=on_error)


@dataclass
class StreamConfig:
    urls: list[str]
    batch_size: int  # per rank
    image_size: int
    steps_per_epoch: int
    seed: int = 0
    resample: bool = True
    shuffle_buffer: int = 2000
    shuffle_initial: int = 500
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # Cut token batches after their longest sequence (exact: causal attention, pooling at the end token). Off for
    # torch.compile, which prefers one static shape.
    trim_tokens: bool = True


class ShardBatches(IterableDataset):
    """One epoch of (images float32 (B,3,S,S), tokens long (B,ctx)) batches for this rank.

    Worker k of K yields the global batch indices b = k, k+K, ... < steps_per_epoch; PyTorch's DataLoader takes
    batches from workers round-robin in order, so the loader yields batches 0, 1, 2, ... of the epoch.
    """

    def __init__(self, cfg: StreamConfig, tokenizer: Callable, epoch: int, rank: int = 0, world: int = 1, skip_batches: int = 0):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.epoch, self.rank, self.world, self.skip_batches = epoch, rank, world, skip_batches
        self.transform = TrainTransform(cfg.image_size, scale=cfg.crop_scale)
        self.skips = SkipCounter()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cfg = self.cfg
        epoch_seed = _seed(cfg.seed, self.epoch)
        urls = shard_stream(cfg.urls, epoch_seed, cfg.resample, self.rank, self.world, worker, workers)
        samples = raw_samples(urls, self.skips)
        samples = _shuffle(
            samples, cfg.shuffle_buffer, cfg.shuffle_initial, rng=random.Random(_seed(epoch_seed, self.rank, worker, 3))
        )
        # Batches of this worker, in order; batches of other workers are taken by them.
        for b in range(worker, cfg.steps_per_epoch, workers):
            if b < self.skip_batches:
                # Already trained on: read and cheaply checked like below, never decoded.
                kept = 0
                while kept < cfg.batch_size:
                    kept += self._open(next(samples), count=False) is not None
                continue
            rng = np.random.default_rng([cfg.seed, self.epoch, self.rank, b])
            images, captions = [], []
            while len(images) < cfg.batch_size:
                sample = next(samples)
                decoded = self._decode(sample, rng)
                if decoded is not None:
                    images.append(decoded[0])
                    captions.append(decoded[1])
            tokens = self.tokenizer(captions)
            if cfg.trim_tokens:
                tokens = tokens[:, : int((tokens != 0).nonzero()[:, 1].max()) + 1]
            yield torch.stack(images), tokens

    def _open(self, sample: dict, count: bool = True) -> tuple[Image.Image, str] | None:
        """Caption and a lazily opened image (header parsed, pixels not decoded), or None with a counted reason.

        These checks are cheap, so resuming applies them to the batches it skips: only an image whose header parses
        but whose pixel data is corrupt can make a resumed run's batches differ from an uninterrupted run's.
        """
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        reject = self.skips if count else (lambda reason, where: None)
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None or "txt" not in sample:
            reject("sample lacks an image or a .txt caption", where)
            return None
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            reject("caption is not UTF-8", where)
            return None
        if not caption:
            reject("empty caption", where)
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(sample[image_ext]))
        except Exception as exc:
            reject(f"unreadable image header ({type(exc).__name__})", where)
            return None
        return image, caption

    def _decode(self, sample: dict, rng: np.random.Generator) -> tuple[torch.Tensor, str] | None:
        opened = self._open(sample)
        if opened is None:
            return None
        image, caption = opened
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        except Exception as exc:
            self.skips(f"undecodable image ({type(exc).__name__})", f"{sample.get('__url__')}:{sample.get('__key__')}")
            return None
        return self.transform(image, rng), caption


def epoch_loader(
    cfg: StreamConfig, tokenizer: Callable, epoch: int, rank: int, world: int, workers: int, skip_batches: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    dataset = ShardBatches(cfg, tokenizer, epoch, rank, world, skip_batches)
    workers = max(0, min(workers, cfg.steps_per_epoch))
    kwargs = {"prefetch_factor": 4, "persistent_workers": False} if workers > 0 else {}
    if workers > 0 and threading.active_count() > 1:
        # Forking a process that runs other threads (an embedded server, a flow runner, a test harness) copies
        # their locks and exit hooks into the workers, which then die at shutdown; start them from a clean
        # fork server instead. The trainer's own process (clipline train / torchrun) has one thread and forks.
        kwargs["multiprocessing_context"] = "forkserver"
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, **kwargs)


def steps_per_epoch(samples_per_epoch: int, batch_size: int, world: int) -> int:
    return max(1, math.ceil(samples_per_epoch / (batch_size * world)))


def iter_captions(urls: list[str], limit: int) -> Iterator[str]:
    """Captions (.txt members) of the shards in order, at most `limit`, for training a tokenizer."""
    skips = SkipCounter()
    n = 0
    for sample in raw_samples(iter(urls), skips):
        if "txt" in sample:
            try:
                yield sample["txt"].decode("utf-8")
            except UnicodeDecodeError:
                continue
            n += 1
            if n >= limit:
                return
