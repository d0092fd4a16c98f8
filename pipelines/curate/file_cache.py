"""Per-input-file curation results kept from one dataset version to the next (``ROOT/curate_cache``).

Reading, caption and URL filters, entry matching and language identification of a row depend only on the row and
on the stage's settings, never on other files: they are done once per input file *content* and kept. A version
with one new URL-list file reads, matches and language-identifies only that file; every earlier file's matched
batches come from the cache. Exact dedup across files, the entry counts and the balancing draw still run over the
whole pool (they change as files arrive), so the output is the same as if every file had been processed now.

    CACHE/<namespace>/<file sha256>/<start>.live.parquet       matched rows (order key of file index 0), with lang
    CACHE/<namespace>/<file sha256>/<start>.rejected.parquet   rows the filters / matching rejected
    CACHE/<namespace>/<file sha256>/_DONE.json                 batches, rows read; written last

namespace = fingerprint of the query list, every curation parameter but the balancing ones (t, target_size), the
read options and the curation code. A file without ``_DONE.json`` (a killed run) is processed again. Language is
identified for every matched row of a cached file, before dedup: the dedup losers' languages are computed too
(their result is not used), which is the price of not depending on other files.
"""
from __future__ import annotations

import dataclasses
import pathlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import markers, storage
from pipelines.curate import querylist as QL
from pipelines.curate import steps as S
from pipelines.curate.readers import InputFile, read_batches

DONE = "_DONE.json"
_LOW_BITS = (1 << S.ORDER_SHIFT) - 1


def namespace(params: S.CurateParams, querylist_hash: str, read_options: dict) -> str:
    """What decides a file's cached batches besides its bytes."""
    here = pathlib.Path(__file__).parent
    code = {p.name: storage.sha256_of(str(p)) for p in sorted(here.iterdir()) if p.suffix == ".py"}
    knobs = {k: v for k, v in params.to_dict().items() if k not in ("t", "target_size")}
    return markers.fingerprint(knobs, querylist_hash, read_options, markers.CODE_VERSION, code)


def _rebase(order: pa.Array | np.ndarray, file_index: int) -> np.ndarray:
    order = np.asarray(order, np.int64)
    return (order & _LOW_BITS) | (np.int64(file_index) << S.ORDER_SHIFT)


class ReadMatchCachedFn(beam.DoFn):
    """One input file -> its matched batches (from the cache, or read, filtered, matched, language-identified and
    added to the cache), each spilled to ``tmp`` as SpillMatched does; tagged outputs ``dedup_keys`` and
    ``files`` as SpillMatched and ReadRawPairs give them."""

    def __init__(self, params: S.CurateParams, querylist_uri: str, n_entries: int, cache_dir: str, spill):
        self.params, self.querylist_uri, self.n_entries = params, querylist_uri, n_entries
        self.cache_dir, self.spill = cache_dir, spill
        self.matcher = self.identifier = None

    def _tools(self):
        if self.matcher is None:  # only a file not yet cached needs them
            from pipelines.curate.langid import EnglishLexicon, LanguageIdentifier, make_backend
            from pipelines.curate.matching import EntryMatcher

            entries = QL.load(self.querylist_uri).entries
            if len(entries) != self.n_entries:
                raise RuntimeError(f"{self.querylist_uri} changed while the pipeline ran")
            self.matcher = EntryMatcher(entries)
            lexicon = EnglishLexicon.cached() if self.params.lexicon_shortcut else None
            self.identifier = LanguageIdentifier(make_backend(self.params.lang_backend, self.params.seed), lexicon)
        return self.matcher, self.identifier

    def _compute(self, inp: InputFile, fdir: str) -> dict:
        matcher, identifier = self._tools()
        zero = dataclasses.replace(inp, index=0)  # cached order keys are of file index 0
        batches, rows = [], 0
        for raw in read_batches(zero, self.params.batch_rows):
            rows += len(raw.urls)
            batch = S.detect_language(S.match_batch(S.filter_batch(raw, self.params), matcher), identifier)
            live, rejected = S.spill_tables(batch)
            storage.write_table(storage.join(fdir, f"{raw.start:012d}.live.parquet"), live, compression="zstd")
            storage.write_table(storage.join(fdir, f"{raw.start:012d}.rejected.parquet"), rejected,
                                compression="zstd")
            batches.append({"start": raw.start, "rows_read": batch.rows_read, "seconds": dict(batch.seconds),
                            "lang_method": dict(batch.lang_method)})
        meta = {"uri": inp.uri, "rows": rows, "batches": batches}
        storage.write_json(storage.join(fdir, DONE), meta)  # last: the file's entry is complete
        return meta

    def _load(self, inp: InputFile, fdir: str, meta: dict, b: dict) -> S.PairBatch:
        live = storage.read_table(storage.join(fdir, f"{b['start']:012d}.live.parquet"))
        rejected = storage.read_table(storage.join(fdir, f"{b['start']:012d}.rejected.parquet"))
        live = live.set_column(live.schema.get_field_index("order"), "order",
                               pa.array(_rebase(live.column("order").to_numpy(), inp.index), pa.int64()))
        if meta["uri"] != inp.uri and rejected.num_rows:  # the same bytes under another name: sources name it
            src = pc.utf8_replace_slice(rejected.column("source"), 0, len(meta["uri"]), inp.uri)
            rejected = rejected.set_column(rejected.schema.get_field_index("source"), "source", src)
        # no step ran now: the batch's step seconds are 0 (stats.json times this run's work, not the cached run's)
        ref = S.BatchRef(f"{inp.index:05d}-{b['start']:012d}", inp.uri, b["rows_read"],
                         {k: 0.0 for k in b["seconds"]}, b["lang_method"])
        return S.unspill(ref, live, rejected)

    def process(self, inp: InputFile):
        sha = storage.sha256_of(inp.uri)
        fdir = storage.join(self.cache_dir, sha)
        done = storage.join(fdir, DONE)
        meta = storage.read_json(done) if storage.exists(done) else self._compute(inp, fdir)
        for b in meta["batches"]:
            yield from self.spill(self._load(inp, fdir, meta, b))
        yield beam.pvalue.TaggedOutput("files", {"uri": inp.uri, "rows": meta["rows"], "bytes": inp.size,
                                                 "sha256": sha})


def cached_files(cache_dir: str, inputs: list[InputFile]) -> int:
    """How many of ``inputs`` the cache holds complete (for the log)."""
    return sum(storage.exists(storage.join(cache_dir, storage.sha256_of(f.uri), DONE)) for f in inputs)
