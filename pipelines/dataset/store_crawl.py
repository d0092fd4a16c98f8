"""The crawl stage of a dataset version: candidates -> the crawl store -> a crawl directory the images stage reads.

:class:`StoreCrawlStage` takes the crawl stage's place (same name, inputs, output and rejected file; see
:func:`pipelines.dataset.hooks.apply_hooks`). ``compute``:

1. reads the candidates (sorted by uid) and the root's takedown set; candidates it matches are rejected with reason
   ``takedown`` and never fetched, and the stored bytes of their URLs are deleted from the store;
2. asks the store for the rest at ``as_of`` (:meth:`CrawlStore.plan`): stored successes and failures whose back-off
   has not expired are reused as they are; only new URLs, URLs stored with other image settings and failures now
   due are downloaded, by the ordinary crawl (``pipelines.crawl.crawl_all``: guard, politeness, robots.txt,
   re-crawl rounds) in ``FETCH/<key>/``, one candidate per URL; the results are recorded in the store and the
   fetch directory is removed;
3. writes the crawl directory from the store alone: ``NNNNN.tar`` + ``NNNNN.parquet`` (img2dataset's columns plus
   the image's sha256/pHash/dHash/size and its offset in the tar, as a clipline crawl writes them), rows in uid
   order, and the crawl rejected rows.

Step 3 depends only on the candidates and the store's records, so a version built incrementally (most records
already stored) and one built from scratch with the same inputs and ``as_of`` get byte-identical crawl
directories, and from there identical pools, decontamination, balancing and shards. The fingerprint holds
``as_of``, the back-off policy and the takedown set's fingerprint: a new takedown or a new ``as_of`` recomputes the
stage (downloading only what is due), an unchanged assembly leaves the later stages' fingerprints unchanged.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from pipelines.core import reasons as R
from pipelines.core import storage
from pipelines.core.stage import Stage, StageResult
from pipelines.dataset import takedown as TD
from pipelines.dataset.crawl_store import (OK, BackoffPolicy, CrawlStore, FetchResult, format_time,
                                           layout_fingerprint, parse_time, url_hash)
from schemas import conform
from schemas import rejected as rejected_schema

ASSEMBLY_VERSION = 1
ROWS_PER_SHARD = 10_000
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
        from pipelines.crawl.driver import read_candidates

        cands = read_candidates(self.input_files())  # validated, sorted by uid
        rows = cands.to_pylist()
        tds = self.takedown_set
        store = CrawlStore.open(self.store_uri, self.backoff)
        blocked = [tds.matches(r["url"], r["uid"]) for r in rows]
        live_urls = {r["url"] for r, b in zip(rows, blocked) if not b}
        doomed = TD.urls_to_delete(tds, ((r["uid"], r["url"]) for r, b in zip(rows, blocked) if b))
        deleted = store.delete(doomed - live_urls)  # a URL that another pair (not taken down) needs stays
        layout = layout_fingerprint(self.config)
        plan = store.plan((r["url"] for r, b in zip(rows, blocked) if not b), self.as_of, layout)
        fetch_report = self._fetch(store, cands, blocked, plan.fetch, layout) if plan.fetch else {}

        index = store.index()
        entries = [None if b else index.get(url_hash(r["url"])) for r, b in zip(rows, blocked)]
        storage.delete_prefix(self.output)
        shard_files = self._assemble(store, cands, blocked, entries)

        rejected_rows, reasons = [], Counter()
        for r, b, e in zip(rows, blocked, entries):
            if b:
                reason, source = R.TAKEDOWN, "takedown"
            elif e is None or e["status"] != OK:
                reason = (e or {}).get("reason") or R.MISSING_FROM_OUTPUT
                source = f"crawl_store:{url_hash(r['url'])}"
            else:
                continue
            reasons[reason] += 1
            rejected_rows.append({"uid": r["uid"], "url": r["url"], "caption": r["caption"], "stage": R.CRAWL,
                                  "reason": reason, "source": source})
        table = pa.Table.from_pylist(rejected_rows, schema=pa.schema([f.with_nullable(True)
                                                                      for f in rejected_schema.SCHEMA]))
        storage.write_table(self.rejected, conform(table, rejected_schema.SCHEMA, where=self.rejected))
        kept = len(rows) - sum(reasons.values())
        counts = plan.counts()
        return StageResult(
            stage="crawl", input_rows=len(rows), kept=kept, rejected=dict(reasons),
            outputs={"shards": shard_files, "rejected": self.rejected}, params=self.params(),
            fingerprint=fingerprint,
            details={"as_of": format_time(self.as_of),
                     "crawl_store": {**counts, "takedown_rows": int(sum(blocked)), "bytes_deleted": len(deleted),
                                     "uri": self.store_uri},
                     "fetch": fetch_report})

    # ------------------------------------------------------------------------------------------------ fetching
    def _fetch(self, store: CrawlStore, cands: pa.Table, blocked: list[bool], urls: list[str], layout: str) -> dict:
        """Download ``urls`` with the ordinary crawl (one candidate per URL) and record every outcome."""
        from pipelines.crawl.driver import crawl_all
        from pipelines.crawl.results import crawl_outcome, host_report

        wanted = set(urls)
        first: dict[str, int] = {}
        for i, (url, b) in enumerate(zip(cands.column("url").to_pylist(), blocked)):
            if not b and url in wanted and url not in first:
                first[url] = i
        subset = cands.take(pa.array(sorted(first.values()), pa.int64()))
        key = hashlib.sha256(json.dumps({"urls": sorted(wanted), "crawl": self.config.to_dict(),
                                         "as_of": self.as_of}, sort_keys=True, default=str).encode()).hexdigest()[:16]
        try:
            for uri in storage.list_prefix(self.fetch_dir):  # fetches of another plan, left by a killed build
                rel = uri[len(str(self.fetch_dir).rstrip("/")) + 1:]
                if not rel.startswith(key + "/"):
                    storage.delete(uri)
        except storage.StorageError:
            pass
        work = storage.join(self.fetch_dir, key)
        cand_uri = storage.join(work, "candidates", "part-00000.parquet")
        if not storage.exists(cand_uri):
            storage.write_table(cand_uri, subset.replace_schema_metadata(None))
        crawl_dir = storage.join(work, "crawl")
        crawl_all(storage.join(work, "candidates"), crawl_dir, self.config, progress=self.progress,
                  log_file=self.log_file)
        outcome = crawl_outcome(crawl_dir)
        ext = self.config.encode_format or "jpg"
        results = []
        for row, data in outcome.iter_images():
            results.append(FetchResult(url=row["url"], status=OK, data=data, ext=ext,
                                       meta={k: row.get(k) for k in ("img_sha256", "img_width", "img_height",
                                                                      "img_error", "phash", "dhash", "width",
                                                                      "height", "original_width",
                                                                      "original_height")}))
        for row in outcome.failures.to_pylist():
            results.append(FetchResult(url=row["url"], status="failed", reason=row["reason"],
                                       error_message=row.get("error_message")))
        store.record(results, self.as_of, layout)
        report = host_report(crawl_dir)
        storage.delete_prefix(work)
        return {"urls": len(wanted), "successes": outcome.successes.num_rows,
                "failures": dict(sorted(Counter(outcome.failures.column("reason").to_pylist()).items())),
                "rounds": report["rounds"], "n_hosts": report["n_hosts"], "host_totals": report["totals"]}

    # ------------------------------------------------------------------------------------------------ assembly
    def _assemble(self, store: CrawlStore, cands: pa.Table, blocked: list[bool], entries: list) -> list[str]:
        """The crawl directory from the store: every candidate not taken down, in uid order."""
        keep = [i for i, b in enumerate(blocked) if not b]
        base = [f.with_nullable(True) for f in cands.schema if f.name not in {f.name for f in _ADDED}]
        schema = pa.schema(base + _ADDED)
        files: list[str] = []
        starts = range(0, len(keep), self.rows_per_shard) if keep else [0]  # nothing left: one empty shard
        for n, start in enumerate(starts):
            idx = keep[start:start + self.rows_per_shard]
            part = cands.take(pa.array(idx, pa.int64())).to_pylist()
            name = f"{n:05d}"
            fd, tmp = tempfile.mkstemp(prefix=f"clipline-store-crawl-{name}-", suffix=".tar")
            out_rows = []
            try:
                with os.fdopen(fd, "wb") as f:
                    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                        for row, i in zip(part, idx):
                            e = entries[i]
                            out = {**row, "key": row["uid"]}
                            if e is not None and e["status"] == OK:
                                data = store.read_image(e)
                                info = tarfile.TarInfo(f"{row['uid']}.{e.get('ext') or 'jpg'}")
                                info.size, info.mtime, info.mode = len(data), 0, 0o644
                                offset = tar.offset + tarfile.BLOCKSIZE
                                tar.addfile(info, io.BytesIO(data))
                                out.update(status="success", error_message=None, jpg_offset=offset,
                                           jpg_size=len(data),
                                           **{k: e.get(k) for k in ("width", "height", "original_width",
                                                                    "original_height", "img_sha256", "img_width",
                                                                    "img_height", "img_error", "phash", "dhash")})
                            else:
                                reason = (e or {}).get("reason") or R.MISSING_FROM_OUTPUT
                                message = f"{REASON_PREFIX}{reason}: stored" if ":" not in reason else \
                                    ((e or {}).get("error_message") or reason)
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
