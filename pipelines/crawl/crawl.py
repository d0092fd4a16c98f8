"""The crawl stage: curation candidates -> img2dataset webdataset shards, resumable, with re-crawls of failures.

A crawl directory holds rounds. Round 0 is the crawl of the candidates, written where img2dataset writes it::

    CRAWL/00000.tar 00000.parquet 00000_stats.json ...      round 0 (img2dataset output; uid, entry_ids... carried)
    CRAWL/recrawl-001/00000.tar ...                         round 1: failures of round 0 fetched again
    CRAWL/_clipline/round-000.input.parquet                 each round's URL list (sorted by uid)
    CRAWL/_clipline/round-000.config.json                   the CrawlConfig it ran with

Resume: img2dataset's incremental mode skips every shard whose ``_stats.json`` exists (written after the shard's
tar and parquet are closed) and redoes the others, so a killed crawl rerun with the same arguments downloads only
unfinished shards. A round counts as finished only when every one of its shards has its stats file; readers of a
crawl (:mod:`pipelines.crawl.results`) refuse unfinished rounds.
"""
from __future__ import annotations

import glob as globlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.reasons import RETRYABLE_REASONS
from schemas import SchemaError, conform
from schemas import candidate as candidate_schema

META_DIR = "_clipline"
# Candidate columns carried through img2dataset as extra columns (url and caption are img2dataset's own).
CARRIED_COLUMNS = ["uid", "entry_ids", "lang", "lang_score", "keep_prob"]
# Settings that decide what a round's shards contain; resuming a round with other values would mix two crawls.
LAYOUT_FIELDS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
                 "min_image_size", "number_sample_per_shard", "compute_hash", "max_image_pixels")


class CrawlError(RuntimeError):
    """A crawl directory cannot be used as asked (different inputs or settings, unfinished rounds...)."""


class CrawlIncompleteError(CrawlError):
    """A crawl round ended with shards not finished; rerunning the same call resumes it."""


@dataclass(frozen=True)
class RoundInfo:
    round_no: int
    directory: Path  # where the round's shards are
    input_path: Path
    n_rows: int
    n_shards: int
    done_shards: tuple[int, ...]

    @property
    def complete(self) -> bool:
        return len(self.done_shards) == self.n_shards


def round_dir(crawl_dir: Path, round_no: int) -> Path:
    return crawl_dir if round_no == 0 else crawl_dir / f"recrawl-{round_no:03d}"


def _meta(crawl_dir: Path, round_no: int, suffix: str) -> Path:
    return crawl_dir / META_DIR / f"round-{round_no:03d}.{suffix}"


def _stats_ids(directory: Path) -> set[int]:
    return {int(p.name.split("_")[0]) for p in directory.glob("*_stats.json") if p.name.split("_")[0].isdigit()}


def list_rounds(crawl_dir: str | os.PathLike) -> list[RoundInfo]:
    """Every round with a URL list in ``crawl_dir``, in order, with how many of its shards are finished."""
    crawl_dir = Path(crawl_dir)
    rounds = []
    for path in sorted((crawl_dir / META_DIR).glob("round-*.input.parquet")):
        m = re.fullmatch(r"round-(\d{3})\.input\.parquet", path.name)
        if not m:
            continue
        r = int(m.group(1))
        n_rows = pq.ParquetFile(path).metadata.num_rows
        config = load_round_config(crawl_dir, r)
        n_shards = math.ceil(n_rows / config.number_sample_per_shard) if n_rows else 0
        d = round_dir(crawl_dir, r)
        done = tuple(sorted(i for i in _stats_ids(d) if i < n_shards)) if d.exists() else ()
        rounds.append(RoundInfo(r, d, path, n_rows, n_shards, done))
    return rounds


def crawl_shard_files(crawl_dir: str | os.PathLike) -> list[tuple[int, Path, Path]]:
    """(round, parquet, tar) of every finished shard of every round, in round then shard order.

    A uid can appear in several rounds (failed in round 0, fetched again in round 1): a reader that walks these
    files must keep one record per uid, the first success, else the latest failure, as crawl_outcome does.
    """
    out = []
    for info in list_rounds(crawl_dir):
        for shard_id in info.done_shards:
            stem = info.directory / f"{shard_id:05d}"
            out.append((info.round_no, stem.with_suffix(".parquet"), stem.with_suffix(".tar")))
    return out


def load_round_config(crawl_dir: str | os.PathLike, round_no: int) -> CrawlConfig:
    path = _meta(Path(crawl_dir), round_no, "config.json")
    try:
        return CrawlConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CrawlError(f"{path}: missing (the round's URL list exists without its config)") from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _candidate_files(candidates: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    items = [candidates] if isinstance(candidates, (str, os.PathLike)) else list(candidates)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise CrawlError(f"{p}: directory holds no *.parquet candidate files")
            files.extend(found)
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(x) for x in globlib.glob(str(item)))
            if not found:
                raise CrawlError(f"{item}: pattern matches no candidate files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise CrawlError(f"{p}: no such candidates file or directory")
    return files


def read_candidates(candidates) -> pa.Table:
    """Read candidate Parquet files (paths, directories or globs), validated against schemas.candidate and
    sorted by uid; a duplicate uid is an error (curation emits each pair once)."""
    tables = []
    for f in _candidate_files(candidates):
        try:
            t = pq.read_table(f)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CrawlError(f"{f}: not a readable Parquet file ({exc})") from None
        try:
            tables.append(conform(t, candidate_schema.SCHEMA, where=str(f)))
        except SchemaError as exc:
            raise CrawlError(str(exc)) from None
    table = pa.concat_tables(tables) if tables else candidate_schema.SCHEMA.empty_table()
    table = table.sort_by("uid")
    counts = pc.value_counts(table.column("uid"))
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dupes):
        raise CrawlError(f"candidates hold {len(dupes)} duplicate uids (first: {dupes[0]['values'].as_py()!r}); "
                         f"curation emits each (url, caption) pair once")
    return table


def _url_list(table: pa.Table) -> pa.Table:
    cols = ["url", "caption"] + [c for c in CARRIED_COLUMNS if c in table.column_names]
    return table.select(cols).replace_schema_metadata(None)


def _check_or_save_config(crawl_dir: Path, round_no: int, config: CrawlConfig) -> None:
    path = _meta(crawl_dir, round_no, "config.json")
    if path.exists():
        saved = CrawlConfig.from_dict(json.loads(path.read_text()))
        changed = [f for f in LAYOUT_FIELDS if getattr(saved, f) != getattr(config, f)]
        if changed:
            detail = ", ".join(f"{f}: {getattr(saved, f)!r} -> {getattr(config, f)!r}" for f in changed)
            raise CrawlError(f"{crawl_dir}: round {round_no} was crawled with other settings ({detail}); "
                             f"use the same settings to resume it, or a new crawl directory")
    _atomic_write_bytes(path, (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode())


def _prepare_round(crawl_dir: Path, round_no: int, url_list: pa.Table, config: CrawlConfig) -> Path:
    """Write (or verify) a round's URL list and config; returns the URL list's path."""
    input_path = _meta(crawl_dir, round_no, "input.parquet")
    if input_path.exists():
        existing = pq.read_table(input_path)
        if not existing.equals(url_list):
            raise CrawlError(f"{crawl_dir}: round {round_no} was started with a different URL list "
                             f"({existing.num_rows} rows in {input_path}, now {url_list.num_rows}); "
                             f"use a new crawl directory for other candidates")
    _check_or_save_config(crawl_dir, round_no, config)
    if not input_path.exists():
        _write_table(input_path, url_list)
    return input_path


def _run_round(crawl_dir: Path, round_no: int, config: CrawlConfig) -> RoundInfo:
    info = next(r for r in list_rounds(crawl_dir) if r.round_no == round_no)
    if not info.complete:
        from pipelines.crawl.guarded_download import guarded_download  # imports img2dataset: only when crawling

        guarded_download(config, url_list=str(info.input_path), output_folder=str(info.directory),
                         additional_columns=[c for c in CARRIED_COLUMNS
                                             if c in pq.read_schema(info.input_path).names])
        info = next(r for r in list_rounds(crawl_dir) if r.round_no == round_no)
    if not info.complete:
        missing = sorted(set(range(info.n_shards)) - set(info.done_shards))
        raise CrawlIncompleteError(f"{info.directory}: round {round_no} finished {len(info.done_shards)} of "
                                   f"{info.n_shards} shards (unfinished: {missing[:10]}); rerun to resume")
    return info


def crawl(candidates, crawl_dir: str | os.PathLike, config: CrawlConfig | None = None) -> RoundInfo:
    """Download the candidates' images into ``crawl_dir`` (round 0), resuming whatever a previous call left
    unfinished. ``candidates``: candidate Parquet file(s), a directory of them, or a glob."""
    config = config or CrawlConfig()
    crawl_dir = Path(crawl_dir)
    _prepare_round(crawl_dir, 0, _url_list(read_candidates(candidates)), config)
    return _run_round(crawl_dir, 0, config)


def recrawl_failures(crawl_dir: str | os.PathLike, config: CrawlConfig | None = None, *, round_no: int = 1,
                     reasons: Iterable[str] | str = "retryable") -> RoundInfo:
    """Fetch again, into new shards under ``crawl_dir/recrawl-NNN/``, the rows that rounds before ``round_no``
    left without an image and whose reason is in ``reasons`` ("retryable": RETRYABLE_REASONS, "all": every
    failure, or an explicit set). Finished shards of earlier rounds are never touched.

    Idempotent per ``round_no``: calling it again for a finished round downloads nothing; for an interrupted one,
    it resumes. Rounds must be run in order.
    """
    from pipelines.crawl.results import crawl_outcome  # results imports this module

    config = config or CrawlConfig()
    crawl_dir = Path(crawl_dir)
    if round_no < 1:
        raise CrawlError(f"round_no must be >= 1 (round 0 is the crawl itself), got {round_no}")
    rounds = {r.round_no: r for r in list_rounds(crawl_dir)}
    for r in range(round_no):
        if r not in rounds or not rounds[r].complete:
            raise CrawlError(f"{crawl_dir}: round {r} is missing or unfinished; run it before recrawl round {round_no}")
    failed = crawl_outcome(crawl_dir, max_round=round_no - 1).failures
    if reasons == "retryable":
        wanted = set(RETRYABLE_REASONS)
        keep = [r in wanted or r.startswith("other:") for r in failed.column("reason").to_pylist()]
    elif reasons == "all":
        keep = [True] * failed.num_rows
    else:
        wanted = set(reasons)  # type: ignore[arg-type]
        keep = [r in wanted for r in failed.column("reason").to_pylist()]
    retry = failed.filter(pa.array(keep, pa.bool_())).sort_by("uid")
    _prepare_round(crawl_dir, round_no, _url_list(retry), config)
    return _run_round(crawl_dir, round_no, config)
