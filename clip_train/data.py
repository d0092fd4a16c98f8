"""Streaming webdataset shards (local paths or s3://) into (image, token) batches for CLIP training.

Shard specs: a directory holding `NNNNN.tar` (+ `sizes.json`), a brace pattern (`DIR/{00000..00009}.tar`), a glob
(`DIR/*.tar`), or the same under `s3://bucket/prefix/`. Every listing and read goes through
`pipelines.core.storage` (S3 objects are streamed with ranged, retried GETs). Several specs can be joined with `::`.

The stream is built from webdataset's tar iterators and shuffle buffer. An epoch is `samples_per_epoch` samples,
i.e. `steps_per_epoch` global batches. Everything random is derived from (seed, epoch, rank, worker) and the
augmentation generator from (seed, epoch, rank, batch index), so the batch sequence is a function of the seed alone:
a resumed run skips the already-trained batches of its epoch by reading (not decoding) their samples and then sees
exactly the batches an uninterrupted run would have seen. Decoding, augmentation and tokenisation run in the
DataLoader workers; bad samples are skipped with a counted reason, never a crash, and the counts travel with the
batches to the trainer, which logs them to metrics.jsonl. With online balancing (`StreamConfig.online`) each epoch
keeps the samples of a new seeded MetaCLIP draw over the pool (see `clip_train.online_balance`).
"""

from __future__ import annotations

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

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from clip_train.errors import DataError
from pipelines.core.errors import ClipError
from clip_train.transforms import TrainTransform
from pipelines.core import storage
from pipelines.core.storage import StorageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------------------------------- shard lists
def _tars_in_directory(directory: str) -> list[str]:
    """The *.tar files directly inside a local directory or an s3:// prefix (not in sub-directories), sorted."""
    prefix = directory.rstrip("/") + "/"
    return sorted(u for u in storage.list_prefix(directory)
                  if u.endswith(".tar") and "/" not in u[len(prefix):] and not u.rsplit("/", 1)[-1].startswith("."))


def _read_sizes(directory: str) -> dict[str, int] | None:
    """sizes.json of a shard directory ({"00000.tar": n, ...}), or None when there is none."""
    uri = storage.join(directory, "sizes.json")
    if not storage.exists(uri):
        return None
    try:
        sizes = json.loads(storage.read_bytes(uri))
        if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
            raise ValueError("expected an object of shard name -> sample count")
    except ValueError as exc:
        raise DataError(f"{uri}: invalid sizes.json: {exc}") from None
    return sizes


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: int | None  # from sizes.json when every shard is listed there


def _is_directory_spec(part: str) -> bool:
    if storage.is_s3(part):
        return part.endswith("/") or not (part.endswith(".tar") or "{" in part or any(c in part for c in "*?["))
    return os.path.isdir(part)


def resolve_shards(spec: str) -> ShardSet:
    """Expand a shard spec into URLs (sorted within each part) and, when sizes.json covers them, the sample count.

    Every listing and existence check goes through :mod:`pipelines.core.storage`, so local paths and s3:// URIs
    behave the same way; a user mistake raises :class:`DataError` naming the spec.
    """
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if _is_directory_spec(part):
            try:
                found = _tars_in_directory(part)
            except StorageError as exc:
                raise DataError(f"shard directory {part}: {exc}") from None
            if not found:
                raise DataError(f"shard directory {part} holds no *.tar files")
            urls += found
            continue
        expanded = storage.expand_braces(part)
        missing = []
        for item in expanded:
            try:
                urls += storage.expand(item)
            except StorageError:
                if any(ch in item for ch in "*?["):
                    raise DataError(f"shard pattern {item} matches no files") from None
                missing.append(item)
        if missing:
            raise DataError(f"{len(missing)} of {len(expanded)} shards of {part!r} do not exist, first: {missing[0]}")
    if not urls:
        raise DataError(f"shard spec {spec!r} names no shards")
    total = 0
    sizes_cache: dict[str, dict[str, int] | None] = {}
    for url in urls:
        directory, name = storage.parent(url) or ".", storage.basename(url)
        if directory not in sizes_cache:
            sizes_cache[directory] = _read_sizes(directory)
        sizes = sizes_cache[directory]
        if sizes is None or name not in sizes:
            return ShardSet(urls, None)
        total += sizes[name]
    return ShardSet(urls, total)


def open_shard(url: str):
    """A binary stream of one shard (local file or s3:// object with ranged, retried reads)."""
    return storage.open_read(url)


# ------------------------------------------------------------------------------------------------- sample stream
def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class SkipCounter:
    """Counts rejected samples/shards per reason (a short, fixed phrase) and logs the first few of each.

    ``counts`` is cumulative; :meth:`take` returns the counts added since its last call, which the loader sends to
    the trainer with every batch so that skips are logged to metrics.jsonl even from DataLoader worker processes.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._taken: dict[str, int] = {}

    def __call__(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.counts[reason] <= 3:
            print(f"clip_train.data: skipped {where}: {reason}{f' ({detail})' if detail else ''}", file=sys.stderr)

    def take(self) -> dict[str, int]:
        delta = {k: v - self._taken.get(k, 0) for k, v in self.counts.items() if v != self._taken.get(k, 0)}
        self._taken = dict(self.counts)
        return delta


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
        raise DataError(
            f"{len(urls)} shards cannot be split over {world} ranks x {workers} workers without resampling; "
            "use resampling (the default) or fewer workers"
        )
    for pass_index in range(sys.maxsize):
        order = urls.copy()
        random.Random(_seed(seed, pass_index, 2)).shuffle(order)
        yield from order[rank::world][worker::workers]


def raw_samples(urls: Iterator[str], skips: SkipCounter) -> Iterator[dict]:
    """Raw {__key__, jpg, txt, ...} dicts from a shard-URL stream, corrupt shards/members skipped."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def opened() -> Iterator[dict]:
        failures_in_a_row = 0
        for url in urls:
            try:
                stream = open_shard(url)
            except Exception as exc:  # unreadable shard: skip it, say why
                skips("cannot open shard", url, str(exc))
                failures_in_a_row += 1
                if failures_in_a_row >= 50:
                    raise DataError(f"50 shards in a row could not be opened; last: {url}: {exc}") from exc
                continue
            failures_in_a_row = 0
            yield {"url": url, "stream": stream}

    def on_error(exc: Exception) -> bool:
        skips("corrupt tar data", "tar member", str(exc.args[0] if exc.args else exc))
        return True

    def guarded(members: Iterator[dict]) -> Iterator[dict]:
        # tar_file_expander ends every shard with {}; a stream of shards that give nothing would loop forever.
        empty_in_a_row, in_shard = 0, 0
        for member in members:
            if member == {}:
                empty_in_a_row = 0 if in_shard else empty_in_a_row + 1
                in_shard = 0
                if empty_in_a_row >= 50:
                    raise DataError(f"50 shards in a row gave no samples; skipped so far: {skips.counts}")
            else:
                in_shard += 1
            yield member

    yield from group_by_keys(guarded(tar_file_expander(opened(), handler=on_error)), handler=on_error)


def sample_meta(sample: dict) -> dict:
    """The sample's .json member as a dict ({} when absent or unreadable)."""
    raw = sample.get("json")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def online_filter(samples: Iterator[dict], online, epoch: int, skips: SkipCounter, stats: dict) -> Iterator[dict]:
    """Keep the samples of this epoch's MetaCLIP draw (a pure function of seed, epoch and uid: resumable)."""
    for sample in samples:
        meta = sample_meta(sample)
        entry_ids = meta.get("entry_ids")
        if entry_ids is None:
            skips("online balance: sample has no entry_ids in its .json", f"{sample.get('__url__')}:{sample.get('__key__')}")
            continue
        uid = str(meta.get("uid") or sample.get("__key__"))
        stats["online_seen"] = stats.get("online_seen", 0) + 1
        try:
            keep = online.keep(epoch, uid, entry_ids)
        except ClipError:  # non-integer entry ids
            skips("online balance: entry_ids are not integers", f"{sample.get('__url__')}:{sample.get('__key__')}")
            continue
        if keep:
            stats["online_kept"] = stats.get("online_kept", 0) + 1
            yield sample


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
    # clip_train.online_balance.OnlineBalance: re-draw MetaCLIP's balanced subset every epoch (None: use all samples).
    online: object | None = None


class ShardBatches(IterableDataset):
    """One epoch of (images float32 (B,3,S,S), tokens long (B,ctx), stats) batches for this rank.

    ``stats`` holds what this worker counted since its previous batch: ``skipped`` ({reason: n}) and, with online
    balancing, ``online_seen`` / ``online_kept``. Worker k of K yields the global batch indices b = k, k+K, ... <
    steps_per_epoch; PyTorch's DataLoader takes batches from workers round-robin in order, so the loader yields
    batches 0, 1, 2, ... of the epoch.
    """

    def __init__(self, cfg: StreamConfig, tokenizer: Callable, epoch: int, rank: int = 0, world: int = 1, skip_batches: int = 0):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.epoch, self.rank, self.world, self.skip_batches = epoch, rank, world, skip_batches
        self.transform = TrainTransform(cfg.image_size, scale=cfg.crop_scale)
        self.skips = SkipCounter()
        self.stats: dict[str, int] = {}

    def samples(self, worker: int = 0, workers: int = 1) -> Iterator[dict]:
        """The raw sample stream of one worker for this epoch: shards, online draw, shuffle buffer."""
        cfg = self.cfg
        epoch_seed = _seed(cfg.seed, self.epoch)
        urls = shard_stream(cfg.urls, epoch_seed, cfg.resample, self.rank, self.world, worker, workers)
        samples = raw_samples(urls, self.skips)
        if cfg.online is not None:
            samples = online_filter(samples, cfg.online, self.epoch, self.skips, self.stats)
        return _shuffle(
            samples, cfg.shuffle_buffer, cfg.shuffle_initial, rng=random.Random(_seed(epoch_seed, self.rank, worker, 3))
        )

    def _take_stats(self) -> dict:
        out = {"skipped": self.skips.take()}
        out.update(self.stats)
        self.stats.clear()
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cfg = self.cfg
        samples = self.samples(worker, workers)
        # Batches of this worker, in order; batches of other workers are taken by them.
        for b in range(worker, cfg.steps_per_epoch, workers):
            if b < self.skip_batches:
                # Already trained on: read and cheaply checked like below, never decoded.
                kept = 0
                while kept < cfg.batch_size:
                    kept += self._open(next(samples), count=False) is not None
                self.stats.clear()
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
            yield torch.stack(images), tokens, self._take_stats()

    def _open(self, sample: dict, count: bool = True) -> tuple[Image.Image, str] | None:
        """Caption and a lazily opened image (header parsed, pixels not decoded), or None with a counted reason.

        These checks are cheap, so resuming applies them to the batches it skips: only an image whose header parses
        but whose pixel data is corrupt can make a resumed run's batches differ from an uninterrupted run's.
        """
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        reject = self.skips if count else (lambda reason, where, detail="": None)
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
            reject("unreadable image header", where, type(exc).__name__)
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
            self.skips("undecodable image", f"{sample.get('__url__')}:{sample.get('__key__')}", type(exc).__name__)
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


def iter_sample_meta(urls: list[str]) -> Iterator[tuple[str, dict]]:
    """(uid, .json metadata) of every sample of the shards, in order, from the Parquet sidecars (``NNNNN.parquet``
    beside ``NNNNN.tar``, as clipline's builds write them) when present, else by reading the tars' .json members."""
    for url in urls:
        sidecar = url[: -len(".tar")] + ".parquet" if url.endswith(".tar") else None
        if sidecar and storage.exists(sidecar):
            table = storage.read_table(sidecar)
            if {"uid", "entry_ids"} <= set(table.column_names):
                for row in table.select(["uid", "entry_ids"]).to_pylist():
                    yield str(row["uid"]), {"uid": row["uid"], "entry_ids": list(row["entry_ids"] or [])}
                continue
        for sample in raw_samples(iter([url]), SkipCounter()):
            meta = sample_meta(sample)
            yield str(meta.get("uid") or sample.get("__key__")), meta
