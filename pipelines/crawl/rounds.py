"""A crawl directory's rounds, read through :mod:`pipelines.core.storage` (local path or ``s3://`` prefix)::

    CRAWL/00000.tar 00000.parquet 00000_stats.json ...      round 0 (published shards)
    CRAWL/recrawl-001/00000.tar ...                         round 1: retryable failures of round 0, fetched again
    CRAWL/_clipline/round-000.input.parquet                 each round's URL list (uid order, hosts spread;
                                                            a long one in uid-range parts: crawl.url_lists)
    CRAWL/_clipline/round-000.config.json                   the CrawlConfig it ran with

A shard is finished when its tar, its Parquet and its ``_stats.json`` are all published (the stats file is
published last); a round is finished when all its shards are.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.errors import ClipError
from pipelines.crawl.config import CrawlConfig

META_DIR = "_clipline"
_INPUT = re.compile(r"round-(\d{3})\.input\.parquet")
_SHARD_FILE = re.compile(r"(\d{5})(_stats\.json|\.tar|\.parquet)")


class CrawlError(ClipError):
    """A crawl directory cannot be used as asked (different inputs or settings, unfinished rounds...)."""


class CrawlIncompleteError(CrawlError):
    """A crawl round ended with shards not finished; rerunning the same call resumes it."""


@dataclass(frozen=True)
class RoundInfo:
    round_no: int
    directory: str  # where the round's shards are published
    input_path: str  # the round's URL list
    n_rows: int
    n_shards: int
    done_shards: tuple[int, ...]

    @property
    def complete(self) -> bool:
        return len(self.done_shards) == self.n_shards

    def shard_uri(self, shard_id: int, suffix: str) -> str:
        return storage.join(self.directory, f"{shard_id:05d}{suffix}")


def round_dir(crawl_dir: str, round_no: int) -> str:
    return str(crawl_dir) if round_no == 0 else storage.join(str(crawl_dir), f"recrawl-{round_no:03d}")


def meta_uri(crawl_dir: str, round_no: int, suffix: str) -> str:
    return storage.join(str(crawl_dir), META_DIR, f"round-{round_no:03d}.{suffix}")


def _listing(uri: str) -> list[str]:
    try:
        return storage.list_prefix(uri)
    except storage.StorageError:
        return []  # a local directory that does not exist yet


def published_shards(directory: str, listing: list[str] | None = None) -> set[int]:
    """Shard ids whose tar, Parquet and stats file are all in ``directory`` (not in its subdirectories)."""
    listing = _listing(directory) if listing is None else listing
    base = str(directory).rstrip("/")
    seen: dict[int, set[str]] = {}
    for uri in listing:
        if storage.parent(uri).rstrip("/") != base:
            continue
        m = _SHARD_FILE.fullmatch(storage.basename(uri))
        if m:
            seen.setdefault(int(m.group(1)), set()).add(m.group(2))
    return {i for i, kinds in seen.items() if len(kinds) == 3}


def list_rounds(crawl_dir: str) -> list[RoundInfo]:
    """Every round with a URL list in ``crawl_dir``, in order, with how many of its shards are finished."""
    crawl_dir = str(crawl_dir)
    listing = _listing(crawl_dir)
    rounds = []
    meta_prefix = storage.join(crawl_dir, META_DIR).rstrip("/")
    inputs = sorted(u for u in listing if storage.parent(u).rstrip("/") == meta_prefix
                    and _INPUT.fullmatch(storage.basename(u)))
    for uri in inputs:
        r = int(_INPUT.fullmatch(storage.basename(uri)).group(1))
        with storage.open_read(uri) as f:
            n_rows = pq.ParquetFile(f).metadata.num_rows
        config = load_round_config(crawl_dir, r)
        n_shards = math.ceil(n_rows / config.number_sample_per_shard) if n_rows else 0
        d = round_dir(crawl_dir, r)
        done = tuple(sorted(i for i in published_shards(d, listing) if i < n_shards))
        rounds.append(RoundInfo(r, d, uri, n_rows, n_shards, done))
    return rounds


def load_round_config(crawl_dir: str, round_no: int) -> CrawlConfig:
    uri = meta_uri(crawl_dir, round_no, "config.json")
    if not storage.exists(uri):
        raise CrawlError(f"{uri}: missing (the round's URL list exists without its config)")
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise CrawlError(f"{uri}: not valid JSON ({exc})") from None
    # Keys added to CrawlConfig since the round ran take their defaults; keys since removed are ignored.
    known = set(CrawlConfig.__dataclass_fields__)
    return CrawlConfig.from_mapping({k: v for k, v in data.items() if k in known})


def crawl_shard_files(crawl_dir: str) -> list[tuple[int, str, str]]:
    """(round, parquet URI, tar URI) of every finished shard of every round, in round then shard order.

    A uid can appear in several rounds (failed in round 0, fetched again in round 1): a reader that walks these
    files must keep one record per uid, the first success, else the latest failure, as crawl_outcome does.
    """
    out = []
    for info in list_rounds(crawl_dir):
        for shard_id in info.done_shards:
            out.append((info.round_no, info.shard_uri(shard_id, ".parquet"), info.shard_uri(shard_id, ".tar")))
    return out
