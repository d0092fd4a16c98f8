"""Pure per-batch steps of the curation stage (no Beam here): filter, match, dedup, language, balance.

Records travel in :class:`PairBatch` objects of up to ~20,000 rows, so per-element pipeline overhead is paid
once per batch, not once per caption. Every step moves the rows it drops into ``batch.rejected`` with a reason,
so a batch always satisfies ``rows_read == live rows + rejected rows``.

A batch is columnar (Arrow / NumPy arrays) and the steps are vectorised (pyarrow.compute, NumPy): the caption and
URL checks clear the ordinary rows in bulk and send only the others through the per-row checks of ``filters``;
matching, the English-lexicon shortcut, keep probabilities and draws work on whole columns. Every output is
byte-identical to the per-row implementation (tests/test_curate_vectorised.py compares them).
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from pipelines.core.config import Config, check
from pipelines.curate import filters as F
from pipelines.curate.readers import RawBatch
from schemas import candidate as candidate_schema
from schemas import conform
from schemas import rejected as rejected_schema

ORDER_SHIFT = 40  # order key = file index << 40 | record index: input order, independent of batching

# Funnel steps in order, and the reasons each one produces.
STEPS = (
    ("read", (F.MALFORMED_RECORD, F.INVALID_UTF8)),
    ("caption_filters", (F.EMPTY_CAPTION, F.INVALID_TEXT, F.TOO_FEW_CHARS, F.TOO_FEW_WORDS, F.TOO_LONG)),
    ("url_checks", (F.MISSING_URL, F.BAD_URL_SCHEME, F.BAD_URL_HOST)),
    ("match", (F.NO_MATCH,)),
    ("dedup", (F.DUPLICATE_URL, F.DUPLICATE_URL_CAPTION)),
    ("language", (F.WRONG_LANGUAGE, F.LOW_LANG_SCORE)),
    ("balance", (F.NOT_SAMPLED,)),
)


_REJECTED_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                              ("reason", pa.string()), ("source", pa.string())])


def _rejected_part(uid, url, caption, reason, source) -> pa.Table:
    """Rejected rows (uid, url, caption, reason, source), each column a list or a pyarrow string array."""
    return pa.Table.from_arrays([c if isinstance(c, pa.Array) else pa.array(c, pa.string())
                                 for c in (uid, url, caption, reason, source)], schema=_REJECTED_SCHEMA)


@dataclass
class PairBatch:
    """Live rows of one batch, column by column (Arrow arrays and NumPy arrays), plus the rows rejected so far.

    ``order`` and ``lines`` are int64 NumPy arrays; ``urls``, ``captions``, ``uids`` and (once identified)
    ``lang`` are pyarrow string arrays, ``entry_ids`` (once matched) a ``list<int32>`` array and ``lang_score`` a
    float32 array. ``rejected`` is a list of tables in the order the rows were dropped.
    """

    batch_id: str
    uri: str
    rows_read: int = 0
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    urls: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    captions: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    uids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    entry_ids: pa.Array | None = None
    lang: pa.Array | None = None
    lang_score: pa.Array | None = None
    lang_method: Counter = field(default_factory=Counter)
    rejected: list = field(default_factory=list)  # pa.Tables (uid, url, caption, reason, source)
    seconds: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.order)

    def source(self, line: int) -> str:
        return f"{self.uri}:{line}"

    def sources(self, lines: np.ndarray) -> pa.Array:
        """``source`` of many rows at once: "uri:line"."""
        return pc.binary_join_element_wise(f"{self.uri}:", pc.cast(pa.array(lines, pa.int64()), pa.string()), "")

    def keep_only(self, keep, reasons) -> None:
        """Move rows whose ``keep`` is False to ``rejected`` with their reason; keep the rest in order.

        ``reasons`` is one reason for every dropped row, or a sequence over all rows (None where kept)."""
        keep = np.asarray(keep, bool)
        if keep.all():
            return
        drop = ~keep
        dropped = np.nonzero(drop)[0]
        if isinstance(reasons, str):
            reason = pa.array([reasons] * len(dropped), pa.string())
        else:
            reason = pa.array([reasons[i] for i in dropped.tolist()], pa.string())
        mask = pa.array(drop)
        self.rejected.append(_rejected_part(self.uids.filter(mask), self.urls.filter(mask),
                                            self.captions.filter(mask), reason, self.sources(self.lines[drop])))
        kmask = pa.array(keep)
        self.order, self.lines = self.order[keep], self.lines[keep]
        self.urls, self.captions, self.uids = (a.filter(kmask) for a in (self.urls, self.captions, self.uids))
        for name in ("entry_ids", "lang", "lang_score"):
            col = getattr(self, name)
            if col is not None:
                setattr(self, name, col.filter(kmask))

    def rejected_table(self) -> pa.Table:
        """Every row rejected so far, in order: one table (uid, url, caption, reason, source)."""
        parts = [t for t in self.rejected if t.num_rows]
        if not parts:
            return _REJECTED_SCHEMA.empty_table()
        return (pa.concat_tables(parts) if len(parts) > 1 else parts[0]).combine_chunks()


DEDUP_MODES = ("url", "url_caption", "none")
LANG_BACKENDS = ("py3langid", "langdetect")


@dataclass(frozen=True)
class CurateParams(Config):
    """Every knob of the curation stage (saved in stats.json). Values are checked here, before any work."""

    min_words: int = 2
    min_chars: int = 5
    max_chars: int = 1000
    max_words: int = 200
    dedup: str = "url"  # url | url_caption | none
    langs: tuple[str, ...] = ("en",)  # empty: keep every language (still identified and stored)
    min_lang_score: float = 0.0
    lang_backend: str = "py3langid"
    lexicon_shortcut: bool = True
    t: float | None = 20_000
    target_size: int | None = None
    balance: bool = True  # False: keep every candidate (keep_prob still stored for a later draw)
    seed: int = 0
    batch_rows: int = 20_000

    def __post_init__(self):
        if isinstance(self.langs, str):
            object.__setattr__(self, "langs", tuple(x for x in self.langs.split(",") if x))
        else:
            object.__setattr__(self, "langs", tuple(self.langs or ()))
        w = "curate"
        for name in ("min_words", "min_chars", "max_chars", "max_words"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{w}.{name}",
                  f"expected an integer >= 0, got {v!r}")
        check(self.min_chars <= self.max_chars, f"{w}.min_chars", f"{self.min_chars} > max_chars {self.max_chars}")
        check(self.min_words <= self.max_words, f"{w}.min_words", f"{self.min_words} > max_words {self.max_words}")
        check(self.dedup in DEDUP_MODES, f"{w}.dedup", f"expected one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        check(self.lang_backend in LANG_BACKENDS, f"{w}.lang_backend",
              f"expected one of {', '.join(LANG_BACKENDS)}, got {self.lang_backend!r}")
        check(isinstance(self.min_lang_score, (int, float)) and 0.0 <= self.min_lang_score <= 1.0,
              f"{w}.min_lang_score", f"expected a number in [0, 1], got {self.min_lang_score!r}")
        check(self.t is None or (isinstance(self.t, (int, float)) and not isinstance(self.t, bool) and self.t > 0
                                 and math.isfinite(self.t)),
              f"{w}.t", f"expected a number > 0, got {self.t!r}")
        check(self.target_size is None or (isinstance(self.target_size, int) and not isinstance(self.target_size, bool)
                                           and self.target_size >= 1),
              f"{w}.target_size", f"expected an integer >= 1, got {self.target_size!r}")
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"{w}.seed",
              f"expected an integer, got {self.seed!r}")
        check(isinstance(self.batch_rows, int) and self.batch_rows >= 1, f"{w}.batch_rows",
              f"expected an integer >= 1, got {self.batch_rows!r}")

    @property
    def caption_cfg(self) -> F.CaptionFilterConfig:
        return F.CaptionFilterConfig(self.min_words, self.min_chars, self.max_chars, self.max_words)


# ---------------------------------------------------------------------------------------------- spill

_SPILL_SCHEMA = pa.schema([("order", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                           ("line", pa.int64()), ("uid", pa.string()), ("entry_ids", pa.list_(pa.int32())),
                           ("lang", pa.string()), ("lang_score", pa.float32())])


def spill_tables(batch: PairBatch) -> tuple[pa.Table, pa.Table]:
    """A batch as two tables (live rows, rejected rows so far), so it can wait on disk at a pipeline barrier
    instead of in the runner's memory."""
    n = len(batch)
    live = pa.Table.from_arrays([
        pa.array(batch.order, pa.int64()), batch.urls, batch.captions, pa.array(batch.lines, pa.int64()), batch.uids,
        batch.entry_ids if batch.entry_ids is not None else pa.array([[]] * n, pa.list_(pa.int32())),
        batch.lang if batch.lang is not None else pa.nulls(n, pa.string()),
        batch.lang_score if batch.lang_score is not None else pa.nulls(n, pa.float32()),
    ], schema=_SPILL_SCHEMA)
    return live, batch.rejected_table()


def _array(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


def unspill(ref: "BatchRef", live: pa.Table, rejected: pa.Table) -> PairBatch:
    batch = PairBatch(batch_id=ref.batch_id, uri=ref.uri, rows_read=ref.rows_read)
    batch.order = _array(live, "order").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    batch.lines = _array(live, "line").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    batch.urls, batch.captions, batch.uids = _array(live, "url"), _array(live, "caption"), _array(live, "uid")
    batch.entry_ids = _array(live, "entry_ids")
    lang = _array(live, "lang")
    if lang.null_count < len(lang):
        batch.lang, batch.lang_score = lang, _array(live, "lang_score")
    batch.rejected = [rejected.select(_REJECTED_SCHEMA.names).cast(_REJECTED_SCHEMA).combine_chunks()]
    batch.seconds.update(ref.seconds)
    batch.lang_method.update(ref.lang_method)
    return batch


@dataclass(frozen=True)
class BatchRef:
    """What travels through the pipeline once a batch is spilled: its id, where it came from, small counters."""

    batch_id: str
    uri: str
    rows_read: int
    seconds: dict
    lang_method: dict

    @classmethod
    def of(cls, batch: PairBatch) -> "BatchRef":
        return cls(batch.batch_id, batch.uri, batch.rows_read, dict(batch.seconds), dict(batch.lang_method))


# ---------------------------------------------------------------------------------------------- filter


def _filter_batch_rows(raw: RawBatch, params: CurateParams) -> PairBatch:
    """filter_batch one row at a time (the reference, and the path for a batch whose text Arrow cannot hold)."""
    batch = PairBatch(batch_id=f"{raw.file_index:05d}-{raw.start:012d}", uri=raw.uri, rows_read=len(raw))
    cfg = params.caption_cfg
    base = raw.file_index << ORDER_SHIFT
    rejected, order, urls, captions, lines, uids = [], [], [], [], [], []
    for i, (url, caption) in enumerate(zip(raw.urls, raw.captions)):
        uid = F.pair_uid(url, caption) if url is not None and caption is not None else None
        reason = raw.bad.get(i) or F.check_caption(caption, cfg) or F.check_url(url)
        if reason:
            rejected.append((uid, url, caption, reason, f"{raw.uri}:{raw.rows[i]}"))
            continue
        order.append(base | (raw.start + i))
        urls.append(url.strip())
        captions.append(caption)
        lines.append(raw.rows[i])
        uids.append(uid)
    batch.order, batch.lines = np.asarray(order, np.int64), np.asarray(lines, np.int64)
    batch.urls, batch.captions, batch.uids = (pa.array(x, pa.string()) for x in (urls, captions, uids))
    if rejected:
        batch.rejected.append(_rejected_part(*(list(c) for c in zip(*rejected))))
    return batch


def _uids(urls: pa.Array, captions: pa.Array) -> list:
    """pair_uid of every row (None where the URL or the caption is null), from the UTF-8 bytes Arrow holds."""
    joined = pc.binary_join_element_wise(urls, captions, "\x00").cast(pa.binary())
    b2 = hashlib.blake2b
    return [None if b is None else b2(b, digest_size=16).hexdigest() for b in joined.to_pylist()]


def filter_batch(raw: RawBatch, params: CurateParams) -> PairBatch:
    """Read-level problems, caption filters and URL checks; computes the pair uid of every row that has one.

    The checks run vectorised over the batch (``filters.caption_ok_fast`` / ``url_ok_fast``); only rows those do
    not clear (rejections, unusual text) go through the per-row checks, so the result is the per-row one."""
    t0 = time.perf_counter()
    n = len(raw)
    bad = raw.bad
    arrays = raw.string_arrays()
    if arrays is not None and not bad:  # Parquet strings: no Python lists at all
        urls, caps = arrays
        url_at, caption_at = (lambda i: urls[i].as_py()), (lambda i: caps[i].as_py())
    else:
        urls_py, caps_py = raw.urls, raw.captions
        url_at, caption_at = urls_py.__getitem__, caps_py.__getitem__
        if bad:  # a bad record may hold text Arrow cannot (lone surrogates): it is handled per row below
            urls_py, caps_py = list(urls_py), list(caps_py)
            for i in bad:
                urls_py[i] = caps_py[i] = None
        try:
            urls = pa.array(urls_py, pa.string())
            caps = pa.array(caps_py, pa.string())
        except (pa.ArrowException, UnicodeEncodeError, TypeError, ValueError):
            batch = _filter_batch_rows(raw, params)
            batch.seconds["filters"] += time.perf_counter() - t0
            return batch
    cfg = params.caption_cfg
    fast = F.caption_ok_fast(caps, cfg) & F.url_ok_fast(urls) if n else np.zeros(0, bool)
    keep = fast.copy()
    uids = _uids(urls, caps)
    reasons: dict[int, str] = {}
    stripped: dict[int, str] = {}
    for i in np.nonzero(~fast)[0].tolist():
        url, caption = url_at(i), caption_at(i)
        reason = bad.get(i) or F.check_caption(caption, cfg) or F.check_url(url)
        if reason:
            reasons[i] = reason
            if i in bad:
                uids[i] = F.pair_uid(url, caption) if url is not None and caption is not None else None
        else:
            keep[i] = True
            if url.strip() != url:
                stripped[i] = url.strip()
    batch = PairBatch(batch_id=f"{raw.file_index:05d}-{raw.start:012d}", uri=raw.uri, rows_read=n)
    if reasons:
        idx = sorted(reasons)
        batch.rejected.append(_rejected_part([uids[i] for i in idx], [url_at(i) for i in idx],
                                             [caption_at(i) for i in idx], [reasons[i] for i in idx],
                                             [f"{raw.uri}:{raw.rows[i]}" for i in idx]))
    if stripped:
        urls_list = urls.to_pylist()
        for i, u in stripped.items():
            urls_list[i] = u
        urls = pa.array(urls_list, pa.string())
    uid_arr = pa.array(uids, pa.string())
    kmask = pa.array(keep)
    base = raw.file_index << ORDER_SHIFT
    batch.order = (base | (raw.start + np.arange(n, dtype=np.int64)))[keep]
    rows = raw.rows
    lines = np.arange(rows.start, rows.stop, rows.step, dtype=np.int64) if isinstance(rows, range) else \
        np.asarray(rows, np.int64).reshape(-1)
    batch.lines = lines[keep]
    batch.urls, batch.captions, batch.uids = urls.filter(kmask), caps.filter(kmask), uid_arr.filter(kmask)
    batch.seconds["filters"] += time.perf_counter() - t0
    return batch


# ---------------------------------------------------------------------------------------------- match


def match_batch(batch: PairBatch, matcher) -> PairBatch:
    t0 = time.perf_counter()
    if hasattr(matcher, "match_arrow"):
        ids = matcher.match_arrow(batch.captions)
    else:
        ids = pa.array(matcher.match_many(batch.captions.to_pylist()), pa.list_(pa.int32()))
    batch.entry_ids = ids
    keep = pc.greater(pc.list_value_length(ids), 0).to_numpy(zero_copy_only=False) if len(ids) else \
        np.zeros(0, bool)
    batch.keep_only(keep, F.NO_MATCH)
    batch.seconds["match"] += time.perf_counter() - t0
    return batch


# ---------------------------------------------------------------------------------------------- dedup


def _h64(text: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest(),
                          "little")


def _xxh(text: str, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"), seed)


def dedup_keys(batch: PairBatch, n_buckets: int) -> Iterable[tuple[int, tuple]]:
    """(bucket, (batch_id, order, url hash hi, url hash lo, caption hash)) arrays per URL-hash bucket."""
    if not len(batch):
        return []
    # Two independent 64-bit hashes of the URL: a false duplicate needs both to collide (~2**-128). The hashes are
    # of the UTF-8 bytes, which Arrow holds already.
    xxh = xxhash.xxh3_64_intdigest
    url_bytes = batch.urls.cast(pa.binary()).to_pylist()
    hi = np.fromiter((xxh(u, 1) for u in url_bytes), np.uint64, len(batch))
    lo = np.fromiter((xxh(u, 2) for u in url_bytes), np.uint64, len(batch))
    cap = np.fromiter((xxh(c, 3) for c in batch.captions.cast(pa.binary()).to_pylist()), np.uint64, len(batch))
    order = np.asarray(batch.order, np.int64)
    bucket = (hi % np.uint64(n_buckets)).astype(np.int64)
    out = []
    for b in np.unique(bucket):
        sel = bucket == b
        out.append((int(b), (batch.batch_id, order[sel], hi[sel], lo[sel], cap[sel])))
    return out


def find_duplicates(parts: Iterable[tuple], mode: str) -> dict[str, list[tuple[int, str]]]:
    """Losers of exact dedup within one bucket: per batch id, (order key, reason).

    The winner of a group is the row earliest in input order. ``mode='url'``: rows sharing a URL are duplicates
    (reason duplicate_url_caption when the caption is the same as the winner's, else duplicate_url);
    ``mode='url_caption'``: only rows sharing URL and caption are.
    """
    parts = list(parts)
    if not parts:
        return {}
    batch_ids = np.concatenate([np.full(len(p[1]), i, np.int64) for i, p in enumerate(parts)])
    order = np.concatenate([p[1] for p in parts])
    hi = np.concatenate([p[2] for p in parts])
    lo = np.concatenate([p[3] for p in parts])
    cap = np.concatenate([p[4] for p in parts])
    keys = (order, cap, lo, hi) if mode == "url_caption" else (order, lo, hi)
    idx = np.lexsort(keys)
    hi, lo, cap, order, batch_ids = hi[idx], lo[idx], cap[idx], order[idx], batch_ids[idx]
    same_group = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    if mode == "url_caption":
        same_group &= cap[1:] == cap[:-1]
    new_group = np.concatenate([[True], ~same_group])
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(hi)), 0))
    losers: dict[str, list[tuple[int, str]]] = {}
    for j in np.nonzero(~new_group)[0]:
        winner = group_start[j]
        reason = F.DUPLICATE_URL_CAPTION if cap[j] == cap[winner] else F.DUPLICATE_URL
        losers.setdefault(parts[batch_ids[j]][0], []).append((int(order[j]), reason))
    return losers


def apply_dedup(batch: PairBatch, losers: Iterable[tuple[int, str]]) -> PairBatch:
    lost = dict(losers)
    if lost:
        reasons = [lost.get(o) for o in batch.order.tolist()]
        batch.keep_only([r is None for r in reasons], reasons)
    return batch


# ---------------------------------------------------------------------------------------------- language


def detect_language(batch: PairBatch, identifier) -> PairBatch:
    """Set ``lang`` / ``lang_score`` of every live row (no row is dropped here)."""
    t0 = time.perf_counter()
    if hasattr(identifier, "detect_arrow"):
        langs, scores, methods = identifier.detect_arrow(batch.captions)
    else:
        results = identifier.detect(batch.captions.to_pylist())
        langs, scores, methods = [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]
    batch.lang = pa.array(langs, pa.string())
    batch.lang_score = pa.array(scores, pa.float32())
    batch.lang_method.update(methods)
    batch.seconds["language"] += time.perf_counter() - t0
    return batch


def filter_language(batch: PairBatch, params: CurateParams) -> PairBatch:
    """Drop rows whose detected language is not allowed or whose score is too low (``lang`` must be set)."""
    allowed = set(params.langs)
    min_score = params.min_lang_score
    langs, scores = batch.lang.to_pylist(), batch.lang_score.to_pylist()
    reasons = [F.WRONG_LANGUAGE if allowed and lang not in allowed else F.LOW_LANG_SCORE if score < min_score
               else None for lang, score in zip(langs, scores)]
    if any(reasons):
        batch.keep_only([r is None for r in reasons], reasons)
    return batch


def language_batch(batch: PairBatch, identifier, params: CurateParams) -> PairBatch:
    return filter_language(detect_language(batch, identifier), params)


# ---------------------------------------------------------------------------------------------- counting


def _flat_ids(batch: PairBatch) -> np.ndarray:
    if batch.entry_ids is None or not len(batch):
        return np.zeros(0, np.int64)
    return pc.list_flatten(batch.entry_ids).to_numpy(zero_copy_only=False).astype(np.int64)


def partial_counts(batch: PairBatch) -> tuple[np.ndarray, np.ndarray]:
    """(entry ids, counts) of this batch's live rows."""
    if not len(batch):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = np.sort(_flat_ids(batch))
    if not len(flat):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate(([0], np.nonzero(flat[1:] != flat[:-1])[0] + 1))
    counts = np.diff(np.concatenate((starts, [len(flat)])))
    return flat[starts], counts.astype(np.int64)


def sample_keys(batch: PairBatch, seed: int) -> list[tuple[int, tuple[int, ...]]]:
    """(hash of uid, entry ids) per live row: the input of the bottom-k sample that sizes ``t`` for a target."""
    return [(_h64(f"{seed}:{uid}", b"sample"), tuple(ids))
            for uid, ids in zip(batch.uids.to_pylist(), batch.entry_ids.to_pylist())]


# ---------------------------------------------------------------------------------------------- balance


def keep_probabilities(entry_ids: pa.Array, counts: np.ndarray, t: float) -> np.ndarray:
    """``metaclip.keep_probability`` of every row of a ``list<int32>`` array, with the same float operations in the
    same order (p_e = 1 if c_e < t else t / c_e; miss *= 1 - p_e over the row's ids in order; 1 - miss), so the
    values are bit-identical to the per-row function."""
    n = len(entry_ids)
    lengths = pc.list_value_length(entry_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(entry_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    c = np.asarray(counts)[flat].astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(c < t, 1.0, float(t) / c.astype(np.float64))
    q = 1.0 - p
    starts = np.zeros(n, np.int64)
    if n:
        np.cumsum(lengths[:-1], out=starts[1:])
    miss = np.ones(n, np.float64)
    for k in range(int(lengths.max()) if n else 0):
        rows = np.nonzero(lengths > k)[0]
        miss[rows] *= q[starts[rows] + k]
    return 1.0 - miss


def uniform_draws(seed: int, uids: Sequence[str]) -> np.ndarray:
    """``metaclip.uniform_draw(seed, uid)`` of many uids: blake2b-64 (big-endian) / 2**64 as float64."""
    b2 = hashlib.blake2b
    digests = b"".join(b2(f"{seed}:{uid}".encode(), digest_size=8).digest() for uid in uids)
    return np.frombuffer(digests, ">u8").astype(np.float64) / 2.0**64


def balance_batch(batch: PairBatch, counts: np.ndarray, t: float, params: CurateParams) -> tuple[pa.Table, pa.Table]:
    """Keep probability per row from the global counts, the per-uid draw, and the two output tables."""
    t0 = time.perf_counter()
    n = len(batch)
    entry_ids = batch.entry_ids if batch.entry_ids is not None else pa.array([[]] * n, pa.list_(pa.int32()))
    probs = keep_probabilities(entry_ids, counts, t)
    if params.balance:
        keep = uniform_draws(params.seed, batch.uids.to_pylist()) < probs
        batch.keep_only(keep, F.NOT_SAMPLED)
        probs = probs[keep]
    n = len(batch)
    candidates = pa.Table.from_arrays([
        batch.uids, batch.urls, batch.captions,
        batch.entry_ids if batch.entry_ids is not None else pa.array([[]] * n, pa.list_(pa.int32())),
        batch.lang if batch.lang is not None else pa.nulls(n, pa.string()),
        batch.lang_score if batch.lang_score is not None else pa.nulls(n, pa.float32()),
        pa.array(probs, pa.float64()),
    ], names=["uid", "url", "caption", "entry_ids", "lang", "lang_score", "keep_prob"])
    candidates = conform(candidates, candidate_schema.SCHEMA, where=f"candidates of batch {batch.batch_id}")
    rejected = rejected_table(batch.rejected_table())
    batch.seconds["balance"] += time.perf_counter() - t0
    return candidates, rejected


def rejected_table(rows, with_stage: bool = True) -> pa.Table:
    """Rejected rows as the output table (with ``stage``): from a table (uid, url, caption, reason, source) or from
    a list of such tuples."""
    if not isinstance(rows, pa.Table):
        rows = _rejected_part(*(list(c) for c in zip(*rows))) if rows else _REJECTED_SCHEMA.empty_table()
    if not with_stage:
        return rows
    table = pa.Table.from_arrays([rows.column("uid"), rows.column("url"), rows.column("caption"),
                                  pa.array(["curate"] * rows.num_rows, pa.string()), rows.column("reason"),
                                  rows.column("source")],
                                 names=["uid", "url", "caption", "stage", "reason", "source"])
    return conform(table, rejected_schema.SCHEMA, where="rejected rows")


def batch_stats(batch: PairBatch, kept: int) -> dict:
    """Counts of one finished batch: rows read, kept, rejected per reason, language methods, seconds per step."""
    return {
        "input_rows": batch.rows_read,
        "kept": kept,
        "rejected": dict(Counter(r for t in batch.rejected for r in t.column("reason").to_pylist())),
        "lang_method": dict(batch.lang_method),
        "seconds": dict(batch.seconds),
    }


def merge_stats(parts: Iterable[dict]) -> dict:
    total = {"input_rows": 0, "kept": 0, "rejected": Counter(), "lang_method": Counter(), "seconds": Counter()}
    for p in parts:
        total["input_rows"] += p["input_rows"]
        total["kept"] += p["kept"]
        for key in ("rejected", "lang_method", "seconds"):
            total[key].update(p[key])
    return {**total, "rejected": dict(sorted(total["rejected"].items())),
            "lang_method": dict(total["lang_method"]), "seconds": {k: round(v, 3) for k, v in total["seconds"].items()}}


def funnel(stats: dict) -> list[dict]:
    """Rows in and out of each step, derived from the per-reason counts."""
    rows_in = stats["input_rows"]
    out = []
    for step, reasons in STEPS:
        dropped = sum(stats["rejected"].get(r, 0) for r in reasons)
        out.append({"step": step, "rows_in": rows_in, "rows_out": rows_in - dropped})
        rows_in -= dropped
    return out
