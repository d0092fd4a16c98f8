"""Reading a finished crawl: one outcome per candidate, a success (where its image is) or a rejected row with a
normalised reason."""
from __future__ import annotations

import itertools
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.crawl.crawl import CrawlError, CrawlIncompleteError, list_rounds, load_round_config
from pipelines.crawl.reasons import normalise_reason
from schemas import conform
from schemas import rejected as rejected_schema

STAGE = "crawl"


@dataclass
class CrawlOutcome:
    """``successes``: one row per candidate that produced an image (uid, key, tar, member, url, caption,
    entry_ids, width, height, original_width, original_height, sha256, round and any other carried columns);
    ``tar`` is relative to ``crawl_dir``. ``failures``: one row per candidate without an image, with ``reason``
    and img2dataset's ``error_message``. ``rejected``: the failures as schemas.rejected rows (stage "crawl")."""

    crawl_dir: Path
    successes: pa.Table
    failures: pa.Table
    reasons: Counter = field(default_factory=Counter)

    @property
    def rejected(self) -> pa.Table:
        f = self.failures
        source = [f"{STAGE}/{p}:{k}" for p, k in zip(f.column("parquet").to_pylist(), f.column("key").to_pylist())]
        table = pa.table({
            "uid": f.column("uid"),
            "url": f.column("url"),
            "caption": f.column("caption"),
            "stage": pa.array([STAGE] * f.num_rows, pa.string()),
            "reason": f.column("reason"),
            "source": pa.array(source, pa.string()),
        })
        return conform(table, rejected_schema.SCHEMA, where=f"{self.crawl_dir} crawl failures")

    @property
    def n_candidates(self) -> int:
        return self.successes.num_rows + self.failures.num_rows

    def iter_images(self) -> Iterator[tuple[dict, bytes]]:
        """Yield (success row, image bytes) for every success, reading each tar once, in (tar, key) order."""
        rows = sorted(self.successes.to_pylist(), key=lambda r: (r["tar"], r["key"]))
        for tar_name, group in itertools.groupby(rows, key=lambda r: r["tar"]):
            wanted = {r["member"]: r for r in group}
            found: dict[str, bytes] = {}
            with tarfile.open(self.crawl_dir / tar_name) as tf:
                for member in tf:
                    if member.name in wanted:
                        found[member.name] = tf.extractfile(member).read()
            for name, row in wanted.items():
                if name not in found:
                    raise CrawlError(f"{self.crawl_dir / tar_name}: member {name} listed as a success is missing")
                yield row, found[name]


def _read_round_rows(crawl_dir: Path, info) -> pa.Table:
    parts = []
    for shard_id in info.done_shards:
        name = f"{shard_id:05d}"
        pq_path = info.directory / f"{name}.parquet"
        try:
            t = pq.read_table(pq_path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CrawlError(f"{pq_path}: unreadable crawl shard metadata ({exc})") from None
        rel_dir = info.directory.relative_to(crawl_dir).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        n = t.num_rows
        t = t.append_column("round", pa.array([info.round_no] * n, pa.int32()))
        t = t.append_column("tar", pa.array([f"{prefix}{name}.tar"] * n, pa.string()))
        t = t.append_column("parquet", pa.array([f"{prefix}{name}.parquet"] * n, pa.string()))
        parts.append(t)
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def crawl_outcome(crawl_dir: str | os.PathLike, *, max_round: int | None = None) -> CrawlOutcome:
    """The outcome of every candidate of a crawl (rounds up to ``max_round``, default all).

    A candidate that succeeded in any round is a success (its earliest success); otherwise it is a failure with
    the reason of its latest attempt. Every candidate of round 0 gets exactly one outcome: one missing from
    img2dataset's output is a failure ``missing_from_output``. Unfinished rounds raise CrawlIncompleteError.
    """
    crawl_dir = Path(crawl_dir)
    rounds = [r for r in list_rounds(crawl_dir) if max_round is None or r.round_no <= max_round]
    if not rounds or rounds[0].round_no != 0:
        raise CrawlError(f"{crawl_dir}: not a clipline crawl directory (no round 0 URL list)")
    for r in rounds:
        if not r.complete:
            raise CrawlIncompleteError(f"{r.directory}: round {r.round_no} has {len(r.done_shards)} of "
                                       f"{r.n_shards} shards finished; rerun the crawl to finish it")
    inputs = pq.read_table(rounds[0].input_path)
    tables = [t for t in (_read_round_rows(crawl_dir, r) for r in rounds) if t is not None]
    rows = pa.concat_tables(tables, promote_options="permissive").to_pylist() if tables else []

    success: dict[str, dict] = {}
    latest_failure: dict[str, dict] = {}
    for row in sorted(rows, key=lambda x: (x["round"], x["key"])):
        uid = row["uid"]
        if row["status"] == "success":
            success.setdefault(uid, row)
        else:
            latest_failure[uid] = row

    ext = {r.round_no: load_round_config(crawl_dir, r.round_no).encode_format for r in rounds}
    ok_rows, fail_rows = [], []
    for cand in inputs.to_pylist():
        uid = cand["uid"]
        if uid in success:
            row = dict(success[uid])
            row["member"] = f"{row['key']}.{ext[row['round']]}"  # img2dataset names members key.encode_format
            ok_rows.append(row)
        elif uid in latest_failure:
            row = dict(latest_failure[uid])
            row["reason"] = normalise_reason(row.get("error_message"))
            fail_rows.append(row)
        else:
            fail_rows.append({**cand, "key": None, "round": 0, "tar": None, "parquet": None, "status": None,
                              "error_message": "not in img2dataset's output", "reason": "missing_from_output"})

    successes = _table(ok_rows, ["uid", "key", "tar", "member", "url", "caption", "entry_ids", "width", "height",
                                 "original_width", "original_height", "sha256", "round"], inputs.schema)
    failures = _table(fail_rows, ["uid", "url", "caption", "entry_ids", "reason", "error_message", "status",
                                  "key", "round", "parquet"], inputs.schema)
    return CrawlOutcome(crawl_dir, successes, failures, Counter(failures.column("reason").to_pylist()))


_TYPES = {"key": pa.string(), "tar": pa.string(), "member": pa.string(), "width": pa.int32(),
          "height": pa.int32(), "original_width": pa.int32(), "original_height": pa.int32(), "sha256": pa.string(),
          "round": pa.int32(), "reason": pa.string(), "error_message": pa.string(), "status": pa.string(),
          "parquet": pa.string()}


def _table(rows: list[dict], first: list[str], input_schema: pa.Schema) -> pa.Table:
    """Rows -> table with ``first`` columns in order, then the other carried candidate columns."""
    carried = [f for f in input_schema if f.name not in first]
    fields = []
    for name in first:
        if name in input_schema.names:
            fields.append(input_schema.field(name))
        else:
            fields.append(pa.field(name, _TYPES[name]))
    fields += carried
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
