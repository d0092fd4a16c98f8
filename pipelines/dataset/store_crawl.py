"""The crawl stage of a dataset version: candidates -> the crawl store -> a crawl directory the images stage reads.

:class:`StoreCrawlStage` takes the crawl stage's place (same name, inputs, output and rejected file; see
:func:`pipelines.dataset.hooks.apply_hooks`). ``compute``:

1. reads the candidates (sorted by uid) and the root's takedown set; candidates it matches are rejected with reason
   ``takedown`` and never fetched, and the stored bytes of their URLs are deleted from the store;
2. asks the store for the rest at ``as_of`` (:meth:`CrawlStore.plan`): stored successes and failures whose back-off
   has not expired are reused as they are; only new URLs, URLs stored with other image settings and failures now
   due are downloaded, by the ordinary crawl (``pipelines.crawl.crawl_all``: guard, politeness, robots.txt,
   re-crawl rounds) in ``FETCH/<key>/`` (key: the crawl settings and ``as_of``), one candidate per URL; the
   results are recorded in the store a batch of images at a time (:data:`RECORD_BYTES`) and the fetch directory
   is removed; a build killed while recording finds the finished fetch and records only what the store lacks;
3. writes the crawl directory from the store alone: ``NNNNN.tar`` + ``NNNNN.parquet`` (img2dataset's columns plus
   the image's sha256/pHash/dHash/size and its offset in the tar, as a clipline crawl writes them), rows in uid
   order, and the crawl rejected rows.

Step 3 depends only on the candidates and the store's records, so a version built incrementally (most records
already stored) and one built from scratch with the same inputs and ``as_of`` get byte-identical crawl
directories, and from there identical pools, decontamination, balancing and shards. The fingerprint holds
``as_of``, the back-off policy and the takedown set's fingerprint: a new takedown or a new ``as_of`` recomputes the
stage (downloading only what is due), an unchanged assembly leaves the later stages' fingerprints unchanged.

Scale: the candidates, their stored records and the plan are Arrow columns (no Python object per candidate); one
assembled shard's rows, the taken-down rows and one batch of downloads are Python objects at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import reasons as R
from pipelines.core import storage
from pipelines.core.stage import Stage, StageResult
from pipelines.core.table_ops import as_array, one_per_key
from pipelines.core.ustar import UstarWriter
from pipelines.dataset import takedown as TD
from pipelines.dataset.crawl_store import (META_COLUMNS, OK, BackoffPolicy, CrawlStore, FetchResult, format_time,
                                           hash_urls, layout_fingerprint, parse_time)
from schemas import conform
from schemas import rejected as rejected_schema

ASSEMBLY_VERSION = 1
ROWS_PER_SHARD = 10_000
RECORD_BYTES = 256 << 20  # a fetch records its images in batches of about this many bytes (one pack each)
REASON_PREFIX = "clipline:"  # pipelines.crawl.reasons reads "clipline:<reason>" back as the reason

_ADDED = [pa.field("key", pa.string()), pa.field("status", pa.string()), pa.field("error_message", pa.string()),
          pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("original_width", pa.int32()),
          pa.field("original_height", pa.int32()), pa.field("img_sha256", pa.string()),
          pa.field("img_width", pa.int32()), pa.field("img_height", pa.int32()), pa.field("img_error", pa.string()),
          pa.field("phash", pa.uint64()), pa.field("dhash", pa.uint64()), pa.field("jpg_offset", pa.int64()),
          pa.field("jpg_size", pa.int64())]


class StoreCrawlStage(Stage):
    """inputs: ``{"candidates": DIR_OR_FILES}``; output: the crawl directory (rewritten whole on compute);
    ``store``: the crawl store URI; ``takedowns``: the root's takedown directory (or None); ``fetch_dir``: where
    downloads are staged (resumable across a killed build with the same ``as_of``); ``progress`` / ``log_file``:
    as for the plain crawl stage, used for the downloads."""

    name = "crawl"
    version = 1

    def __init__(self, config, inputs: Mapping[str, Any], output: str, *, rejected: str | None = None,
                 store: str, as_of: str | int, takedowns: str | None = None,
                 backoff: BackoffPolicy | None = None, fetch_dir: str | None = None,
                 rows_per_shard: int = ROWS_PER_SHARD, beam_args: Sequence[str] = (), progress=None,
                 log_file: str | None = None):
        from pipelines.crawl.config import CrawlConfig

        config = config if isinstance(config, CrawlConfig) else CrawlConfig.from_mapping(config or {}, "crawl")
        super().__init__(config, inputs, str(output),
                         rejected=rejected or storage.join(storage.parent(str(output)), "rejected", "crawl.parquet"),
                         beam_args=beam_args)
        self.store_uri, self.takedowns = store, takedowns
        self.as_of = parse_time(as_of)
        self.backoff = backoff or BackoffPolicy()
        self.fetch_dir = fetch_dir or storage.join(storage.parent(str(output)), "fetch")
        self.rows_per_shard = rows_per_shard
        self.progress, self.log_file = progress, log_file  # handed to the crawl of the URLs to fetch
        self._tds: TD.TakedownSet | None = None

    @property
    def takedown_set(self) -> TD.TakedownSet:
        if self._tds is None:
            self._tds = TD.load(self.takedowns) if self.takedowns else TD.TakedownSet()
        return self._tds

    def input_files(self) -> list[str]:
        from pipelines.crawl.driver import candidate_files

        return candidate_files(self.inputs["candidates"])

    def params(self) -> dict:
        return {"crawl": self.config.to_dict(), "as_of": format_time(self.as_of), "backoff": self.backoff.to_dict(),
                "crawl_store": {"assembly": ASSEMBLY_VERSION, "rows_per_shard": self.rows_per_shard}}

    def extra_fingerprint(self):
        return {"takedowns": self.takedown_set.fingerprint()}

    # ------------------------------------------------------------------------------------------------ compute
    def compute(self, fingerprint: str) -> StageResult:
        """Column-wise over the candidates (Arrow); Python objects only for one assembled shard at a time, the
        taken-down rows and one batch of downloads being recorded."""
        from pipelines.crawl.driver import read_candidates

        cands = read_candidates(self.input_files())  # validated, sorted by uid
        urls, uids = as_array(cands.column("url")), as_array(cands.column("uid"))
        tds = self.takedown_set
        store = CrawlStore.open(self.store_uri, self.backoff)
        blocked = TD.blocked_mask(tds, uids, urls)
        live = pc.invert(blocked)
        doomed = TD.urls_to_delete(tds, zip(uids.filter(blocked).to_pylist(), urls.filter(blocked).to_pylist()))
        doomed = pa.array(sorted(doomed), pa.string())  # a URL that another pair (not taken down) needs stays
        deleted = store.delete(doomed.filter(pc.invert(pc.is_in(doomed, value_set=urls.filter(live)))).to_pylist())
        layout = layout_fingerprint(self.config)
        plan = store.plan(urls.filter(live), self.as_of, layout)
        counts = plan.counts()
        fetch = plan.fetch_urls
        fetch_report = self._fetch(store, cands, live, fetch, layout) if len(fetch) else {}
        del plan

        hashes = hash_urls(urls)
        entries = store.lookup(hashes)  # row for row with the candidates (null rows: never stored)
        storage.delete_prefix(self.output)
        shard_files = self._assemble(store, cands, live, entries)

        status = pc.fill_null(as_array(entries.column("status")), "")
        bad = pc.or_(blocked, pc.not_equal(status, OK))
        stored_reason = as_array(entries.column("reason"))
        reason = pc.if_else(blocked, R.TAKEDOWN,
                            pc.if_else(pc.fill_null(pc.not_equal(stored_reason, ""), False), stored_reason,
                                       R.MISSING_FROM_OUTPUT))
        source = pc.if_else(blocked, "takedown", pc.binary_join_element_wise("crawl_store:", hashes, ""))
        n = cands.num_rows
        table = pa.table({"uid": uids, "url": urls, "caption": as_array(cands.column("caption")),
                          "stage": pa.array(np.full(n, R.CRAWL, object), pa.string()) if n else
                          pa.array([], pa.string()),
                          "reason": reason, "source": source}).filter(bad)
        storage.write_table(self.rejected, conform(table, rejected_schema.SCHEMA, where=self.rejected))
        reasons = Counter({d["values"]: d["counts"] for d in pc.value_counts(table.column("reason")).to_pylist()})
        kept = n - table.num_rows
        return StageResult(
            stage="crawl", input_rows=n, kept=kept, rejected=dict(reasons),
            outputs={"shards": shard_files, "rejected": self.rejected}, params=self.params(),
            fingerprint=fingerprint,
            details={"as_of": format_time(self.as_of),
                     "crawl_store": {**counts, "takedown_rows": int(pc.sum(blocked).as_py() or 0),
                                     "bytes_deleted": len(deleted), "uri": self.store_uri},
                     "fetch": fetch_report})

    # ------------------------------------------------------------------------------------------------ fetching
    def _fetch(self, store: CrawlStore, cands: pa.Table, live: pa.Array, urls: pa.Array, layout: str) -> dict:
        """Download ``urls`` with the ordinary crawl (one candidate per URL, the first in uid order) and record
        every outcome, a batch of at most :data:`RECORD_BYTES` of images at a time.

        The fetch directory is keyed by the crawl settings and ``as_of``: a build killed while recording finds
        its crawl finished and records only what the store still lacks (``urls`` is what the store plans to
        fetch, so a URL recorded before the kill is not among them)."""
        from pipelines.crawl.driver import crawl_all
        from pipelines.crawl.results import ShardLayoutError, host_report, iter_outcomes

        wanted = urls.cast(pa.string())
        picked = pc.and_(live, pc.is_in(as_array(cands.column("url")), value_set=wanted))
        idx = pc.indices_nonzero(picked)
        firsts = pa.table({"url": as_array(cands.column("url")).take(idx), "i": idx}).sort_by(
            [("url", "ascending"), ("i", "ascending")])
        firsts = one_per_key(firsts, "url")
        first_rows = as_array(firsts.column("i"))
        subset = cands.take(first_rows.take(pc.array_sort_indices(first_rows)))  # in uid order
        key = hashlib.sha256(json.dumps({"crawl": self.config.to_dict(), "as_of": self.as_of},
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        work = storage.join(self.fetch_dir, key)
        cand_uri = storage.join(work, "candidates", "part-00000.parquet")
        try:
            for uri in storage.list_prefix(self.fetch_dir):  # fetches of another plan, left by a killed build
                rel = uri[len(str(self.fetch_dir).rstrip("/")) + 1:]
                if not rel.startswith(key + "/"):
                    storage.delete(uri)
        except storage.StorageError:
            pass
        if storage.exists(cand_uri):  # a killed build's fetch: reused when it holds every URL wanted now
            have = storage.read_table(cand_uri, columns=["url"]).column("url")
            if not pc.all(pc.is_in(wanted, value_set=as_array(have).cast(pa.string()))).as_py():
                storage.delete_prefix(work)
        if not storage.exists(cand_uri):
            storage.write_table(cand_uri, subset.replace_schema_metadata(None))
        crawl_dir = storage.join(work, "crawl")
        crawl_all(storage.join(work, "candidates"), crawl_dir, self.config, progress=self.progress,
                  log_file=self.log_file)

        ext = self.config.encode_format or "jpg"
        successes, failures = 0, Counter()
        recorded: list[pa.Array] = []

        def record_parts(parts, todo: pa.Array) -> None:
            nonlocal successes
            for part in parts:
                ok = part.successes.filter(pc.is_in(part.successes.column("url"), value_set=todo))
                bad = part.failures.filter(pc.is_in(part.failures.column("url"), value_set=todo))
                batch: list[FetchResult] = []
                size = 0
                for row, data in dataclasses.replace(part, successes=ok).iter_images():
                    batch.append(FetchResult(url=row["url"], status=OK, data=data, ext=ext,
                                             meta={k: row.get(k) for k in META_COLUMNS}))
                    size += len(data)
                    if size >= RECORD_BYTES:
                        store.record(batch, self.as_of, layout)
                        batch, size = [], 0
                store.record(batch + [FetchResult(url=r["url"], status="failed", reason=r["reason"],
                                                  error_message=r.get("error_message"))
                                      for r in bad.select(["url", "reason", "error_message"]).to_pylist()],
                             self.as_of, layout)
                successes += ok.num_rows
                failures.update({d["values"]: d["counts"]
                                 for d in pc.value_counts(bad.column("reason")).to_pylist()})
                recorded.extend([as_array(ok.column("url")), as_array(bad.column("url"))])

        try:
            record_parts(iter_outcomes(crawl_dir), wanted)
        except ShardLayoutError:  # never for a crawl this package wrote; decided whole, minus what is recorded
            done = pa.concat_arrays([a.cast(pa.string()) for a in recorded]) if recorded else \
                pa.array([], pa.string())
            record_parts(iter_outcomes(crawl_dir, rows_per_part=None),
                         wanted.filter(pc.invert(pc.is_in(wanted, value_set=done))))
        report = host_report(crawl_dir)
        storage.delete_prefix(work)
        return {"urls": len(wanted), "successes": successes, "failures": dict(sorted(failures.items())),
                "rounds": report["rounds"], "n_hosts": report["n_hosts"], "host_totals": report["totals"]}

    # ------------------------------------------------------------------------------------------------ assembly
    def _assemble(self, store: CrawlStore, cands: pa.Table, live: pa.Array, entries: pa.Table) -> list[str]:
        """The crawl directory from the store: every candidate not taken down, in uid order; one shard's rows at
        a time as Python objects."""
        keep = pc.indices_nonzero(live)
        base = [f.with_nullable(True) for f in cands.schema if f.name not in {f.name for f in _ADDED}]
        schema = pa.schema(base + _ADDED)
        files: list[str] = []
        starts = range(0, len(keep), self.rows_per_shard) if len(keep) else [0]  # nothing left: one empty shard
        for n, start in enumerate(starts):
            idx = keep.slice(start, self.rows_per_shard)
            part = cands.take(idx).to_pylist()
            part_entries = entries.take(idx).to_pylist()
            name = f"{n:05d}"
            fd, tmp = tempfile.mkstemp(prefix=f"clipline-store-crawl-{name}-", suffix=".tar")
            out_rows = []
            try:
                with os.fdopen(fd, "wb") as f, UstarWriter(f) as tar, store.image_reader() as read_image:
                    for row, e in zip(part, part_entries):
                        out = {**row, "key": row["uid"]}
                        if e["status"] == OK:
                            data = read_image(e)
                            offset = tar.add(f"{row['uid']}.{e.get('ext') or 'jpg'}", data, mode=0o644)
                            out.update(status="success", error_message=None, jpg_offset=offset,
                                       jpg_size=len(data),
                                       **{k: e.get(k) for k in ("width", "height", "original_width",
                                                                "original_height", "img_sha256", "img_width",
                                                                "img_height", "img_error", "phash", "dhash")})
                        else:
                            reason = e.get("reason") or R.MISSING_FROM_OUTPUT
                            message = f"{REASON_PREFIX}{reason}: stored" if ":" not in reason else \
                                (e.get("error_message") or reason)
                            out.update(status="failed", error_message=message)
                        out_rows.append(out)
                tar_uri = storage.join(self.output, f"{name}.tar")
                storage.write_file_atomic(tar_uri, tmp)
            finally:
                os.unlink(tmp)
            pq_uri = storage.join(self.output, f"{name}.parquet")
            table = pa.Table.from_pylist(out_rows, schema=schema)
            storage.write_table(pq_uri, table)
            files += [tar_uri, pq_uri]
        return files


def read_store_crawl(crawl_dir: str) -> pa.Table:
    """Every row of an assembled crawl directory, in shard order."""
    parts = sorted(u for u in storage.list_prefix(crawl_dir) if u.endswith(".parquet"))
    return pa.concat_tables([storage.read_table(u) for u in parts])
