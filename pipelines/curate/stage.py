"""The curation stage as an Apache Beam pipeline: raw URL lists -> matched, filtered, balanced candidates.

Graph (one composite PTransform per step, each wrapping the pure functions of ``curate_steps``)::

    ReadRawPairs -> FilterRecords -> MatchEntries -> SpillMatched -> DedupPairs -> IdentifyLanguage ─┬─> CountEntries ─┐
                                                                                                   │   (SolveT)     │
                                                                                                   └─> BalanceAndWrite <┘

Batches of ~20,000 rows are the pipeline elements. At the two barriers (the dedup shuffle and the global entry
count) a batch waits as Parquet under ``OUT/_tmp/`` and only a small reference travels, so the runner's memory
does not grow with the number of input rows.

Outputs (local dir or s3://): ``candidates/part-*.parquet``, ``rejected/curate-part-*.parquet``,
``entry_counts.parquet`` and ``stats.json``, written last: a directory without stats.json is unfinished and a
rerun starts it again. Every file is written whole (temp + rename, or one S3 PUT). Names and contents depend only
on the inputs and parameters, never on the runner or the number of workers.
"""
from __future__ import annotations

import functools
import heapq
import json
import logging
import time
from dataclasses import asdict, replace
from importlib.metadata import version

import apache_beam as beam
import numpy as np
import pyarrow as pa

from pipelines.curate import steps as S
from pipelines.curate import querylist as QL
from pipelines.core import markers, storage
from pipelines.core.stage import MARKER, Stage, StageResult
from pipelines.core.storage import StorageError
from pipelines.balance.metaclip import DEFAULT_T, solve_t_from_sample
from pipelines.core.beam import MultiOutput, make_options
from pipelines.curate.readers import InputFile, read_batches, resolve_inputs
from schemas import conform
from schemas import entry_counts as counts_schema
from schemas.stage_stats import validate_stats

log = logging.getLogger(__name__)
N_DEDUP_BUCKETS = 64
REJECTED_PREFIX = "curate-"
SAMPLE_SIZE = 1_000_000  # rows used to size t for --target-size (exact when the pool is smaller)
STATS_VERSION = 1


# ---------------------------------------------------------------------------------------------- transforms


class _ReadFile(beam.DoFn):
    def __init__(self, batch_rows: int):
        self.batch_rows = batch_rows

    def process(self, inp: InputFile):
        rows = 0
        for raw in read_batches(inp, self.batch_rows):
            rows += len(raw.urls)
            yield raw
        yield beam.pvalue.TaggedOutput("files", {"uri": inp.uri, "rows": rows, "bytes": inp.size,
                                                 "sha256": storage.sha256_of(inp.uri)})


class ReadRawPairs(beam.PTransform):
    """Input files -> RawBatch elements (plus a tagged output 'files' with rows and content hash per file)."""

    def __init__(self, inputs: list[InputFile], batch_rows: int):
        super().__init__()
        self.inputs, self.batch_rows = inputs, batch_rows

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(self.inputs)
                | "Spread" >> beam.Reshuffle()
                | "Read" >> MultiOutput(_ReadFile(self.batch_rows), ["files"], main="batches"))


class FilterRecords(beam.PTransform):
    def __init__(self, params: S.CurateParams):
        super().__init__()
        self.params = params

    def expand(self, batches):
        return batches | "Filter" >> beam.Map(S.filter_batch, self.params)


class _MatchFn(beam.DoFn):
    def __init__(self, querylist_uri: str, n_entries: int):
        self.querylist_uri, self.n_entries = querylist_uri, n_entries
        self.matcher = None

    def setup(self):
        from pipelines.curate.matching import EntryMatcher

        # Each worker reads the list itself: shipping 500,000 entries inside the pickled DoFn costs seconds.
        entries = QL.load(self.querylist_uri).entries
        if len(entries) != self.n_entries:
            raise RuntimeError(f"{self.querylist_uri} changed while the pipeline ran")
        self.matcher = EntryMatcher(entries)  # built once per worker

    def process(self, batch):
        yield S.match_batch(batch, self.matcher)


class MatchEntries(beam.PTransform):
    """MetaCLIP substring matching with one Aho-Corasick automaton per worker; no match -> rejected."""

    def __init__(self, querylist_uri: str, n_entries: int):
        super().__init__()
        self.querylist_uri, self.n_entries = querylist_uri, n_entries

    def expand(self, batches):
        return batches | "Match" >> beam.ParDo(_MatchFn(self.querylist_uri, self.n_entries))


def _spill(batch: S.PairBatch, tmp: str, step: str) -> S.BatchRef:
    live, rejected = S.spill_tables(batch)
    # Scratch files: written whole (rename) but not fsynced; a crash reruns the stage from the start anyway.
    _write_parquet(storage.join(tmp, step, f"{batch.batch_id}.live.parquet"), live, durable=False)
    _write_parquet(storage.join(tmp, step, f"{batch.batch_id}.rejected.parquet"), rejected, durable=False)
    return S.BatchRef.of(batch)


def _unspill(ref: S.BatchRef, tmp: str, step: str) -> S.PairBatch:
    live = _read_parquet(storage.join(tmp, step, f"{ref.batch_id}.live.parquet"))
    rejected = _read_parquet(storage.join(tmp, step, f"{ref.batch_id}.rejected.parquet"))
    return S.unspill(ref, live, rejected)


class _SpillFn(beam.DoFn):
    """Park a matched batch on disk (the runner then holds only a small reference) and emit its dedup keys."""

    def __init__(self, tmp: str, dedup: str):
        self.tmp, self.dedup = tmp, dedup

    def process(self, batch):
        yield from spill_matched(batch, self.tmp, self.dedup)


def spill_matched(batch: S.PairBatch, tmp: str, dedup: str):
    if dedup == "none":
        # No dedup, so no barrier before language ID: the batch goes on as it is (no spill file written and
        # read back); IdentifyLanguage takes a PairBatch as well as a BatchRef.
        yield batch
        return
    for item in S.dedup_keys(batch, N_DEDUP_BUCKETS):
        yield beam.pvalue.TaggedOutput("dedup_keys", item)
    yield _spill(batch, tmp, "matched")


class SpillMatched(beam.PTransform):
    def __init__(self, tmp: str, dedup: str):
        super().__init__()
        self.tmp, self.dedup = tmp, dedup

    def expand(self, batches):
        return batches | "Spill" >> MultiOutput(_SpillFn(self.tmp, self.dedup), ["dedup_keys"], main="refs")


def _join_losers(element):
    _batch_id, grouped = element
    (ref,) = grouped["ref"]
    losers = [x for part in grouped["losers"] for x in part]
    return ref, losers


class DedupPairs(beam.PTransform):
    """Exact dedup by URL (or URL + caption): URL hashes are shuffled by bucket, each bucket picks the earliest
    row of every group, and the losers are joined back to their batch reference by batch id."""

    def __init__(self, mode: str, dedup_keys):
        super().__init__()
        self.mode, self.dedup_keys = mode, dedup_keys

    def expand(self, refs):
        if self.mode == "none":
            return refs | "NoLosers" >> beam.Map(lambda ref: (ref, []))
        keyed = refs | "KeyByBatch" >> beam.Map(lambda r: (r.batch_id, r))
        losers = (self.dedup_keys
                  | "GroupBuckets" >> beam.GroupByKey()
                  | "FindDuplicates" >> beam.FlatMap(lambda kv, mode: S.find_duplicates(kv[1], mode).items(),
                                                     self.mode))
        return ({"ref": keyed, "losers": losers}
                | "Join" >> beam.CoGroupByKey()
                | "Pair" >> beam.Map(_join_losers))


class _LanguageFn(beam.DoFn):
    """Apply dedup losers, identify the language of the survivors, spill again; emit counts (and sample keys)."""

    def __init__(self, params: S.CurateParams, tmp: str):
        self.params, self.tmp = params, tmp
        self.identifier = None

    def setup(self):
        from pipelines.curate.langid import EnglishLexicon, LanguageIdentifier, make_backend

        lexicon = EnglishLexicon.cached() if self.params.lexicon_shortcut else None
        self.identifier = LanguageIdentifier(make_backend(self.params.lang_backend, self.params.seed), lexicon)

    def process(self, ref_losers):
        ref, losers = ref_losers
        batch = ref if isinstance(ref, S.PairBatch) else _unspill(ref, self.tmp, "matched")  # PairBatch: dedup none
        batch = S.apply_dedup(batch, losers)
        if batch.lang is None:
            batch = S.detect_language(batch, self.identifier)
        batch = S.filter_language(batch, self.params)  # identified already when the batch came from the file cache
        yield beam.pvalue.TaggedOutput("counts", S.partial_counts(batch))
        if self.params.target_size is not None:
            yield beam.pvalue.TaggedOutput("sample", S.sample_keys(batch, self.params.seed))
            yield beam.pvalue.TaggedOutput("pool_size", len(batch))
        yield _spill(batch, self.tmp, "live")


class IdentifyLanguage(beam.PTransform):
    """Language ID only on rows still alive after matching and dedup (it is the costly step)."""

    def __init__(self, params: S.CurateParams, tmp: str):
        super().__init__()
        self.params, self.tmp = params, tmp

    def expand(self, refs_with_losers):
        return refs_with_losers | "Language" >> MultiOutput(_LanguageFn(self.params, self.tmp),
                                                            ["counts", "sample", "pool_size"], main="refs")


class _SumCounts(beam.CombineFn):
    def __init__(self, n_entries: int):
        self.n = n_entries

    def create_accumulator(self):
        return np.zeros(self.n, np.int64)

    def add_input(self, acc, part):
        ids, counts = part
        acc = acc.copy()  # never mutate: a runner may hand the same accumulator object to several consumers
        np.add.at(acc, ids, counts)
        return acc

    def merge_accumulators(self, accs):
        # A new array: some runners (Dask) hand the same accumulator object to several consumers, so merging
        # in place into accs[0] would change what another step reads.
        total = np.zeros(self.n, np.int64)
        for a in accs:
            total += a
        return total

    def extract_output(self, acc):
        return acc


class CountEntries(beam.PTransform):
    """Entry counts over the whole matched pool: a global combine of per-batch sparse counts."""

    def __init__(self, n_entries: int):
        super().__init__()
        self.n = n_entries

    def expand(self, partial_counts):
        return partial_counts | "Sum" >> beam.CombineGlobally(_SumCounts(self.n))


class _BottomK(beam.CombineFn):
    """The k rows with the smallest hash: a deterministic uniform sample, the same on any runner."""

    def __init__(self, k: int):
        self.k = k

    def create_accumulator(self):
        return []

    def add_input(self, acc, rows):
        return heapq.nsmallest(self.k, acc + rows)

    def merge_accumulators(self, accs):
        return heapq.nsmallest(self.k, [x for a in accs for x in a])

    def extract_output(self, acc):
        return sorted(acc)


def _solve_t(sample, counts, target: int, pool_size: int) -> float:
    return solve_t_from_sample([ids for _h, ids in sample], counts, target, pool_size)


class _BalanceWriteFn(beam.DoFn):
    """Balance one batch with the global entry counts and write its candidates and rejected rows.

    The counts travel through storage (``entry_counts.parquet``, written by WriteCounts), not as a runner side
    input: only the small summary dict orders this step after the count, and every worker reads the same file.
    """

    def __init__(self, out: str, params: S.CurateParams, tmp: str, rejected_out: str):
        self.out, self.params, self.tmp, self.rejected_out = out, params, tmp, rejected_out
        self._counts = None

    def counts(self) -> np.ndarray:
        if self._counts is None:
            table = storage.read_table(storage.join(self.out, "entry_counts.parquet"))
            self._counts = table.column("count").to_numpy().astype(np.int64)
        return self._counts

    def process(self, ref, balance_info):
        batch = _unspill(ref, self.tmp, "live")
        candidates, rejected = S.balance_batch(batch, self.counts(), float(balance_info["t"]), self.params)
        name = f"part-{batch.batch_id}.parquet"
        _write_parquet(storage.join(self.out, "candidates", name), candidates)
        _write_parquet(storage.join(self.rejected_out, f"{REJECTED_PREFIX}{name}"), rejected)
        yield S.batch_stats(batch, candidates.num_rows)


class BalanceAndWrite(beam.PTransform):
    """keep_prob = 1 - prod(1 - p_e) from the global counts, the per-uid draw, and one Parquet per batch."""

    def __init__(self, out: str, params: S.CurateParams, tmp: str, balance_info, rejected_out: str):
        super().__init__()
        self.out, self.params, self.tmp, self.balance_info = out, params, tmp, balance_info
        self.rejected_out = rejected_out

    def expand(self, refs):
        return refs | "BalanceWrite" >> beam.ParDo(
            _BalanceWriteFn(self.out, self.params, self.tmp, self.rejected_out),
            beam.pvalue.AsSingleton(self.balance_info))


def _write_parquet(uri: str, table: pa.Table, durable: bool = True) -> None:
    # spill files (durable=False) use the faster lz4; every file is written whole either way
    storage.write_table(uri, table, compression="zstd" if durable else "lz4")


def _read_parquet(uri: str) -> pa.Table:
    return storage.read_table(uri)


def _write_counts(counts: np.ndarray, out: str, t: float):
    table = pa.table({"entry_id": pa.array(np.arange(len(counts), dtype=np.int32)),
                      "count": pa.array(counts, pa.int64())})
    _write_parquet(storage.join(out, "entry_counts.parquet"), conform(table, counts_schema.SCHEMA,
                                                                        where="entry_counts"))
    return {"t": float(t), "entries_matched": int((counts > 0).sum()),
            "entries_at_or_over_t": int((counts >= t).sum()), "matched_pairs_entry_total": int(counts.sum())}


# ---------------------------------------------------------------------------------------------- the stage


def read_stats(out: str) -> dict | None:
    """stats.json of a finished curation output (None when the stage has not finished there)."""
    marker = markers.read(storage.join(out, MARKER))
    uri = storage.join(out, "stats.json")
    if marker is None or not all(storage.exists(f) for f in marker.get("files", [])) or not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError:
        return None


def _clear_outputs(out: str, rejected_out: str) -> None:
    for sub in ("candidates", "_tmp"):
        storage.delete_prefix(storage.join(out, sub))
    if storage.is_s3(rejected_out) or storage.exists(rejected_out):
        for uri in storage.list_prefix(rejected_out):
            if storage.basename(uri).startswith(REJECTED_PREFIX):
                storage.delete(uri)
    for name in ("entry_counts.parquet", "stats.json"):
        storage.delete(storage.join(out, name))


class CurateStage(Stage):
    """Raw URL lists + query list -> matched, filtered, language-identified, balanced candidates (Beam).

    inputs: ``{"raw": [file / glob / directory, ...], "querylist": URI}``; output: the curation directory;
    ``rejected``: the directory that gets ``curate-part-*.parquet`` (default ``OUT/rejected``).
    """

    name = "curate"
    file_cache: str | None = None  # per-input-file results (pipelines.curate.file_cache); set for dataset versions

    def __init__(self, config: S.CurateParams | None, inputs, output: str, *, rejected: str | None = None,
                 beam_args=(), url_col: str = "url", caption_col: str = "caption", fmt: str | None = None,
                 columns: list[str] | None = None, runner: str = "direct", workers: int = 1):
        config = config or S.CurateParams()
        if config.target_size is not None:
            config = replace(config, t=None)
        elif config.t is None:
            config = replace(config, t=DEFAULT_T)
        super().__init__(config, inputs, output, rejected=rejected or storage.join(output, "rejected"),
                         beam_args=beam_args)
        self.read_options = {"url_col": url_col, "caption_col": caption_col, "fmt": fmt, "columns": columns}
        self.runner, self.workers = runner, workers
        self._files: list[InputFile] | None = None
        self._qlist = None

    @property
    def files(self) -> list[InputFile]:
        if self._files is None:
            raw = self.inputs["raw"]
            self._files = resolve_inputs([raw] if isinstance(raw, str) else list(raw), **self.read_options)
        return self._files

    @property
    def qlist(self):
        if self._qlist is None:
            self._qlist = QL.load(self.inputs["querylist"])
        return self._qlist

    def input_files(self) -> list[str]:
        return [f.uri for f in self.files]

    def params(self) -> dict:
        return {**self.config.to_dict(), "read": self.read_options}

    def extra_fingerprint(self):
        return {"querylist": self.qlist.content_hash, "stats_version": STATS_VERSION}

    def compute(self, fingerprint: str) -> StageResult:
        params, out, rejected_out, files, qlist = self.config, self.output, self.rejected, self.files, self.qlist
        querylist = self.inputs["querylist"]
        started = time.time()
        _clear_outputs(out, rejected_out)
        tmp = storage.join(out, "_tmp", fingerprint[:16])
        tmp_stats = storage.join(tmp, "stats.json")
        options = make_options(runner=self.runner, workers=self.workers, extra=self.beam_args)
        cache_dir = None
        if self.file_cache:
            from pipelines.curate import file_cache

            cache_dir = storage.join(self.file_cache, file_cache.namespace(params, qlist.content_hash,
                                                                           self.read_options))
            log.info("curate: %d of %d input files from the per-file cache", file_cache.cached_files(cache_dir, files),
                     len(files))
        with beam.Pipeline(options=options) as p:
            if cache_dir:
                read = matched = (p | "Files" >> beam.Create(files) | "Spread" >> beam.Reshuffle()
                                  | "ReadMatchCached" >> MultiOutput(
                                      file_cache.ReadMatchCachedFn(params, querylist, len(qlist), cache_dir,
                                                                   functools.partial(spill_matched, tmp=tmp,
                                                                                     dedup=params.dedup)),
                                      ["dedup_keys", "files"], main="refs"))
            else:
                read = p | "ReadRawPairs" >> ReadRawPairs(files, params.batch_rows)
                matched = (read.batches
                           | "FilterRecords" >> FilterRecords(params)
                           | "MatchEntries" >> MatchEntries(querylist, len(qlist))
                           | "SpillMatched" >> SpillMatched(tmp, params.dedup))
            live = (matched.refs
                    | "DedupPairs" >> DedupPairs(params.dedup, matched.dedup_keys)
                    | "IdentifyLanguage" >> IdentifyLanguage(params, tmp))
            counts = live.counts | "CountEntries" >> CountEntries(len(qlist))
            if params.target_size is not None:
                sample = live.sample | "BottomK" >> beam.CombineGlobally(_BottomK(SAMPLE_SIZE))
                pool_size = live.pool_size | "SumPool" >> beam.CombineGlobally(sum)
                t = (counts
                     | "SolveT" >> beam.Map(lambda c, s, n, target: _solve_t(s, c, target, n),
                                            beam.pvalue.AsSingleton(sample), beam.pvalue.AsSingleton(pool_size),
                                            params.target_size))
            else:
                t = p | "FixedT" >> beam.Create([float(params.t)])
            balance_info = (counts
                            | "WriteCounts" >> beam.Map(_write_counts, out, beam.pvalue.AsSingleton(t)))
            batch_stats = live.refs | "BalanceAndWrite" >> BalanceAndWrite(out, params, tmp, balance_info, rejected_out)
            files_info = read.files | "ListFiles" >> beam.combiners.ToList()
            (batch_stats
             | "MergeStats" >> beam.combiners.ToList()
             | "Finalize" >> beam.Map(_write_tmp_stats, tmp_stats, beam.pvalue.AsSingleton(balance_info),
                                      beam.pvalue.AsSingleton(files_info)))

        stats = json.loads(storage.read_bytes(tmp_stats))
        storage.delete_prefix(storage.join(out, "_tmp"))
        stats.update({
            "stage": "curate",
            "version": STATS_VERSION,
            "params": {**asdict(params), "langs": list(params.langs)},
            "params_hash": fingerprint,
            "querylist": {"uri": querylist, "sha256": qlist.content_hash, "entries": len(qlist)},
            "runner": {"runner": self.runner, "workers": self.workers, "args": self.beam_args},
            "versions": _versions(),
            "elapsed_s": round(time.time() - started, 3),
        })
        validate_stats(stats)
        stats_uri = storage.write_json(storage.join(out, "stats.json"), stats, indent=2)
        candidates = sorted(u for u in storage.list_prefix(storage.join(out, "candidates")) if u.endswith(".parquet")) \
            if storage.is_s3(out) or storage.exists(storage.join(out, "candidates")) else []
        rejected_files = sorted(u for u in storage.list_prefix(rejected_out)
                                if storage.basename(u).startswith(REJECTED_PREFIX)) \
            if storage.is_s3(rejected_out) or storage.exists(rejected_out) else []
        return StageResult(
            stage="curate", input_rows=stats["input_rows"], kept=stats["kept"], rejected=stats["rejected"],
            outputs={"candidates": candidates, "entry_counts": storage.join(out, "entry_counts.parquet"),
                     "stats": stats_uri, "rejected": rejected_files},
            params=self.params(), fingerprint=fingerprint,
            details={k: stats[k] for k in ("steps", "balance", "inputs", "querylist")})


def run_curate(inputs: list[str], querylist: str, out: str, params: S.CurateParams | None = None, *,
               url_col: str = "url", caption_col: str = "caption", fmt: str | None = None,
               columns: list[str] | None = None, runner: str = "direct", workers: int = 1,
               beam_args: list[str] | None = None, force: bool = False, rejected_out: str | None = None) -> dict:
    """Run the curation stage and return its stats.json (plus ``reused``). A finished output with the same inputs
    (content hashes), query list and parameters is reused."""
    stage = CurateStage(params, {"raw": list(inputs), "querylist": querylist}, out, rejected=rejected_out,
                        beam_args=beam_args or [], url_col=url_col, caption_col=caption_col, fmt=fmt,
                        columns=columns, runner=runner, workers=workers)
    result = stage.run(force=force)
    stats = read_stats(out) or {}
    stats["reused"] = result.reused
    return stats


def _write_tmp_stats(parts, uri, balance_info, files_info):
    stats = S.merge_stats(parts)
    stats["steps"] = S.funnel(stats)
    stats["balance"] = balance_info
    stats["inputs"] = sorted(files_info, key=lambda f: f["uri"])
    storage.write_bytes_atomic(uri, json.dumps(stats).encode())


def _versions() -> dict:
    out = {}
    for pkg in ("clipline", "apache-beam", "pyarrow", "pyahocorasick", "py3langid", "langdetect", "wordfreq"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing distribution is recorded, not fatal
            out[pkg] = None
    return out


def read_candidates(out: str) -> pa.Table:
    """All candidates of a finished curation output (raises if it is unfinished)."""
    if read_stats(out) is None:
        raise StorageError(f"{out}: curation output is unfinished (no {MARKER}); run the curate stage first")
    parts = sorted(storage.list_prefix(storage.join(out, "candidates")))
    tables = [storage.read_table(u) for u in parts if u.endswith(".parquet")]
    from schemas import candidate

    return pa.concat_tables(tables) if tables else candidate.SCHEMA.empty_table()
