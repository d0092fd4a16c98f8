"""The crawl: curation candidates -> webdataset shards, resumable, with re-crawl rounds of retryable failures.

    crawl_all("BUILD/curate/candidates/", "BUILD/crawl", config)   # round 0, then config.recrawl_rounds rounds
    crawl(candidates, crawl_dir, config)                           # round 0 only
    recrawl_failures(crawl_dir, config, round_no=1)                # one re-crawl round

The layout of a crawl directory (local or ``s3://``) is described in :mod:`pipelines.crawl.rounds`. Every read
and write goes through :mod:`pipelines.core.storage`. Resume: a round's finished shards are those published with
their stats file; a rerun with the same arguments crawls only the others. A re-crawl round fetches again the
failures of earlier rounds whose reason is retryable (``pipelines.core.reasons.RETRYABLE_CRAWL_REASONS``), except
URLs that already timed out twice.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.crawl import url_lists
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.engine import ROBOTS_STORE, ProgressHook, run_round, staging_root
from pipelines.crawl.reasons import RETRYABLE_REASONS
from pipelines.crawl.results import map_outcomes, shard_stats
from pipelines.crawl.robots_store import RobotsStore
from pipelines.crawl.rounds import (META_DIR, CrawlError, CrawlIncompleteError, RoundInfo, crawl_shard_files,
                                    list_rounds, load_round_config, meta_uri, round_dir)
from schemas import SchemaError, conform
from schemas import candidate as candidate_schema

__all__ = ["CARRIED_COLUMNS", "LAYOUT_FIELDS", "META_DIR", "MAX_TIMEOUTS", "CrawlError", "CrawlIncompleteError",
           "RoundInfo", "candidate_files", "crawl", "crawl_all", "crawl_shard_files", "list_rounds",
           "load_round_config", "read_candidates", "recrawl_failures", "round_dir"]

# Candidate columns carried through img2dataset as extra columns (url and caption are img2dataset's own).
CARRIED_COLUMNS = ["uid", "entry_ids", "lang", "lang_score", "keep_prob"]
# Settings that decide what a round's shards contain; resuming a round with other values would mix two crawls.
LAYOUT_FIELDS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
                 "min_image_size", "number_sample_per_shard", "compute_hash", "max_image_pixels")
MAX_TIMEOUTS = 2  # a URL that timed out this many times is not tried again


def candidate_files(candidates: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Candidate Parquet files named by paths/URIs, directories/prefixes (their *.parquet) or globs."""
    items = [candidates] if isinstance(candidates, (str, os.PathLike)) else list(candidates)
    files: list[str] = []
    for item in items:
        item = str(item)
        if any(ch in item for ch in "*?[{"):
            found = storage.expand([item], missing_ok=True)
            if not found:
                raise CrawlError(f"{item}: pattern matches no candidate files")
            files.extend(found)
        elif storage.is_s3(item) and storage.exists(item):
            files.append(item)
        elif storage.is_s3(item) or os.path.isdir(item):
            try:
                listed = storage.list_prefix(item)
            except storage.StorageError:
                listed = []
            found = sorted(u for u in listed if u.endswith(".parquet")
                           and storage.parent(u).rstrip("/") == item.rstrip("/")
                           and not storage.basename(u).startswith((".", "_")))
            if not found:
                what = "prefix" if storage.is_s3(item) else "directory"
                raise CrawlError(f"{item}: {what} holds no *.parquet candidate files")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise CrawlError(f"{item}: no such candidates file or directory")
    return files


def read_candidates(candidates) -> pa.Table:
    """Read candidate Parquet files (paths, directories or globs), validated against schemas.candidate and
    sorted by uid; a duplicate uid is an error (curation emits each pair once)."""
    tables = []
    for f in candidate_files(candidates):
        try:
            with storage.open_read(f) as fh:
                t = pq.read_table(fh)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CrawlError(f"{f}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from None
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


def _url_list(table: pa.Table, prior_timeouts: list[int] | None = None) -> pa.Table:
    """A round's URL list: ``table``'s rows (in uid order) with each host's URLs spread evenly over the list, so
    that every shard holds its fair share of each host (``host_order.spread_hosts``)."""
    cols = ["url", "caption"] + [c for c in CARRIED_COLUMNS if c in table.column_names]
    return url_lists.ordered(table, cols, None if prior_timeouts is None else pa.array(prior_timeouts, pa.int32()))


def _same_rows(a: pa.Table, b: pa.Table) -> bool:
    """The same rows in any order (a URL list written in uid order by an earlier version, resumed as it is)."""
    if a.schema != b.schema or a.num_rows != b.num_rows or "uid" not in a.column_names:
        return False
    return a.sort_by("uid").equals(b.sort_by("uid"))


def _check_or_save_config(crawl_dir: str, round_no: int, config: CrawlConfig) -> None:
    uri = meta_uri(crawl_dir, round_no, "config.json")
    if storage.exists(uri):
        saved = load_round_config(crawl_dir, round_no)
        changed = [f for f in LAYOUT_FIELDS if getattr(saved, f) != getattr(config, f)]
        if changed:
            detail = ", ".join(f"{f}: {getattr(saved, f)!r} -> {getattr(config, f)!r}" for f in changed)
            raise CrawlError(f"{crawl_dir}: round {round_no} was crawled with other settings ({detail}); "
                             f"use the same settings to resume it, or a new crawl directory")
    storage.write_json(uri, config.to_dict(), indent=2)


def _describe_difference(old: pa.Table, new: pa.Table) -> str:
    a = set(old.column("uid").to_pylist()) if "uid" in old.column_names else set()
    b = set(new.column("uid").to_pylist()) if "uid" in new.column_names else set()
    if a != b:
        return f"{len(b - a)} uids added, {len(a - b)} removed"
    return "same uids, other URLs, captions or carried columns"


def _prepare_round(crawl_dir: str, round_no: int, url_list: pa.Table, config: CrawlConfig) -> str:
    """Write (or verify) a round's URL list and config; returns the URL list's URI."""
    input_uri = meta_uri(crawl_dir, round_no, "input.parquet")
    exists = storage.exists(input_uri)
    if exists:
        existing = storage.read_table(input_uri)
        # The list is fixed once written (its shards refer to its order): the same rows in another order (an
        # earlier version wrote uid order) are resumed as they are.
        if not existing.equals(url_list) and not _same_rows(existing, url_list):
            raise CrawlError(f"{crawl_dir}: round {round_no} was started with a different URL list "
                             f"({input_uri}: {existing.num_rows} rows, now {url_list.num_rows}; "
                             f"{_describe_difference(existing, url_list)}); use a new crawl directory for other "
                             f"candidates")
    _check_or_save_config(crawl_dir, round_no, config)
    if not exists:
        storage.write_table(input_uri, url_list)
    return input_uri


def _round(crawl_dir: str, round_no: int) -> RoundInfo:
    return next(r for r in list_rounds(crawl_dir) if r.round_no == round_no)


def _run_round(crawl_dir: str, round_no: int, config: CrawlConfig, progress: ProgressHook | None,
               log_file: str | None) -> RoundInfo:
    info = _round(crawl_dir, round_no)
    if not info.complete:
        root = staging_root(config, crawl_dir)
        os.makedirs(root, exist_ok=True)
        log_file = log_file or os.path.join(root, "crawl.log")
        with storage.open_read(info.input_path) as f:
            columns = pq.read_schema(f).names
        before = {"done": 0, "successes": 0, "reasons": {}}
        for s in shard_stats(info):
            before["done"] += s.get("count", 0)
            before["successes"] += s.get("successes", 0)
            for k, v in (s.get("reasons") or {}).items():
                before["reasons"][k] = before["reasons"].get(k, 0) + v
        run_round(config, round_no=round_no, url_list=info.input_path, publish_dir=info.directory,
                  done_shards=set(info.done_shards), additional_columns=[c for c in columns
                                                                         if c not in ("url", "caption")],
                  staging=os.path.join(root, f"round-{round_no:03d}"), log_file=log_file, progress=progress,
                  total=info.n_rows, before=before)
        info = _round(crawl_dir, round_no)
    if not info.complete:
        missing = sorted(set(range(info.n_shards)) - set(info.done_shards))
        raise CrawlIncompleteError(f"{info.directory}: round {round_no} finished {len(info.done_shards)} of "
                                   f"{info.n_shards} shards (unfinished: {missing[:10]}); rerun to resume "
                                   f"(worker messages are in {log_file})")
    return info


def crawl(candidates, crawl_dir: str | os.PathLike, config: CrawlConfig | None = None, *,
          progress: ProgressHook | None = None, log_file: str | None = None) -> RoundInfo:
    """Download the candidates' images into ``crawl_dir`` (round 0), resuming whatever a previous call left
    unfinished. ``candidates``: candidate Parquet file(s), a directory of them, or a glob."""
    config = config or CrawlConfig()
    crawl_dir = str(crawl_dir)
    files = candidate_files(candidates)
    n_rows = url_lists.count_rows(files)
    if n_rows <= config.url_list_part_rows:
        _prepare_round(crawl_dir, 0, _url_list(read_candidates(files)), config)
    else:  # a pool's worth of candidates: the list is built in parts, never whole (pipelines.crawl.url_lists)
        _prepare_parted_round(crawl_dir, files, n_rows, config)
    return _run_round(crawl_dir, 0, config, progress, log_file)


def _prepare_parted_round(crawl_dir: str, files: list[str], n_rows: int, config: CrawlConfig) -> str:
    """:func:`_prepare_round` for round 0 of more than ``url_list_part_rows`` candidates: the list is written (or,
    when the round exists, built again beside it and compared) part by part."""
    input_uri = meta_uri(crawl_dir, 0, "input.parquet")
    columns = ["url", "caption", *CARRIED_COLUMNS]
    root = staging_root(config, crawl_dir)
    os.makedirs(root, exist_ok=True)
    if storage.exists(input_uri):
        check = os.path.join(root, "url-list-check.parquet")
        try:
            parts = url_lists.write_parted(files, check, columns, part_rows=config.url_list_part_rows,
                                           n_rows=n_rows, tmp_dir=root)
            same = url_lists.same_list(input_uri, check)
        finally:
            storage.delete(check)
        if not same:
            saved = load_round_config(crawl_dir, 0).url_list_part_rows if storage.exists(
                meta_uri(crawl_dir, 0, "config.json")) else None
            hint = (f"it was built with url_list_part_rows={saved}, now {config.url_list_part_rows}; use the same "
                    f"value to resume it" if saved is not None and saved != config.url_list_part_rows else
                    "use a new crawl directory for other candidates")
            raise CrawlError(f"{crawl_dir}: round 0 was started with a different URL list ({input_uri}; the "
                             f"candidates now give another one, in {parts} parts); {hint}")
        _check_or_save_config(crawl_dir, 0, config)
        return input_uri
    _check_or_save_config(crawl_dir, 0, config)
    url_lists.write_parted(files, input_uri, columns, part_rows=config.url_list_part_rows, n_rows=n_rows,
                           tmp_dir=root)
    return input_uri


def _retry_filter(reasons: Iterable[str] | str):
    """The function that keeps, of a part's failures, those to fetch again, with their timeout counts."""
    if reasons == "all":
        wanted = None
    else:
        wanted = pa.array(list(RETRYABLE_REASONS) if reasons == "retryable" else [reasons] if isinstance(reasons, str)
                          else list(reasons), pa.string())

    def to_retry(part) -> pa.Table:  # part by part: only the failures to fetch again are kept
        failed = part.failures
        timeouts = (pc.fill_null(failed.column("timeouts"), 0).cast(pa.int32()) if "timeouts" in failed.column_names
                    else pa.array([0] * failed.num_rows, pa.int32()))
        keep = pc.less(timeouts, MAX_TIMEOUTS)
        if wanted is not None:
            keep = pc.and_(keep, pc.is_in(failed.column("reason"), value_set=wanted))
        return failed.filter(keep).append_column("prior_timeouts", timeouts.filter(keep))

    return to_retry


def retry_candidates(crawl_dir: str, before_round: int, reasons: Iterable[str] | str = "retryable") -> pa.Table:
    """The failures of rounds before ``before_round`` to fetch again, sorted by uid, with their timeout counts."""
    return pa.concat_tables(map_outcomes(crawl_dir, _retry_filter(reasons), max_round=before_round - 1)).sort_by("uid")


def _prepare_retry_round(crawl_dir: str, round_no: int, reasons, config: CrawlConfig) -> None:
    """A re-crawl round's URL list: the failures to fetch again, gathered part by part into local files; up to
    ``url_list_part_rows`` of them listed whole as before, more in uid-range parts (:mod:`url_lists`)."""
    root = staging_root(config, crawl_dir)
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="clipline-retry-", dir=root)
    try:
        to_retry = _retry_filter(reasons)
        files: list[str] = []
        schemas: list[pa.Schema] = []

        def kept(part) -> int:
            table = to_retry(part)
            schemas.append(table.schema)
            if table.num_rows:
                files.append(os.path.join(work, f"{len(files):06d}.parquet"))
                pq.write_table(table, files[-1])
            return table.num_rows

        total = sum(map_outcomes(crawl_dir, kept, max_round=round_no - 1))
        if total <= config.url_list_part_rows or not files:
            retry = (pa.concat_tables([pq.read_table(f) for f in files]) if files
                     else schemas[0].empty_table() if schemas
                     else retry_candidates(crawl_dir, round_no, reasons)).sort_by("uid")
            _prepare_round(crawl_dir, round_no, _url_list(retry, retry.column("prior_timeouts").to_pylist()), config)
            return
        _check_or_save_config(crawl_dir, round_no, config)
        columns = ["url", "caption", *[c for c in CARRIED_COLUMNS if c in pq.read_schema(files[0]).names],
                   "prior_timeouts"]
        url_lists.write_parted(files, meta_uri(crawl_dir, round_no, "input.parquet"), columns,
                               part_rows=config.url_list_part_rows, n_rows=total, tmp_dir=work, candidates=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def recrawl_failures(crawl_dir: str | os.PathLike, config: CrawlConfig | None = None, *, round_no: int = 1,
                     reasons: Iterable[str] | str = "retryable", progress: ProgressHook | None = None,
                     log_file: str | None = None) -> RoundInfo:
    """Fetch again, into new shards under ``crawl_dir/recrawl-NNN/``, the rows that rounds before ``round_no``
    left without an image and whose reason is in ``reasons`` ("retryable": RETRYABLE_REASONS, "all": every
    failure, or an explicit set), except URLs that timed out twice. Finished shards of earlier rounds are never
    touched.

    Idempotent per ``round_no``: calling it again for a finished round downloads nothing; for an interrupted one,
    it resumes. Rounds must be run in order.
    """
    config = config or CrawlConfig()
    crawl_dir = str(crawl_dir)
    if round_no < 1:
        raise CrawlError(f"round_no must be >= 1 (round 0 is the crawl itself), got {round_no}")
    rounds = {r.round_no: r for r in list_rounds(crawl_dir)}
    for r in range(round_no):
        if r not in rounds or not rounds[r].complete:
            raise CrawlError(f"{crawl_dir}: round {r} is missing or unfinished; run it before recrawl round {round_no}")
    if round_no in rounds:  # the URL list is fixed once written: resume it as it is
        _check_or_save_config(crawl_dir, round_no, config)
    else:
        _prepare_retry_round(crawl_dir, round_no, reasons, config)
    return _run_round(crawl_dir, round_no, config, progress, log_file)


def crawl_all(candidates, crawl_dir: str | os.PathLike, config: CrawlConfig | None = None, *,
              progress: ProgressHook | None = None, log_file: str | None = None) -> list[RoundInfo]:
    """Round 0, then ``config.recrawl_rounds`` re-crawl rounds (each skipped when it has nothing to fetch)."""
    config = config or CrawlConfig()
    rounds = [crawl(candidates, crawl_dir, config, progress=progress, log_file=log_file)]
    for r in range(1, config.recrawl_rounds + 1):
        rounds.append(recrawl_failures(crawl_dir, config, round_no=r, progress=progress, log_file=log_file))
    # Every round is finished: the robots.txt decisions the rounds shared are not needed any more (a later crawl
    # into this directory, e.g. a new dataset version, asks the hosts again).
    RobotsStore(os.path.join(staging_root(config, str(crawl_dir)), ROBOTS_STORE)).remove()
    return rounds
