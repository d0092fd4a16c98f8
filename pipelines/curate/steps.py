"""Pure per-batch steps of the curation stage (no Beam here): filter, match, dedup, language, balance.

Records travel in :class:`PairBatch` objects of up to ~20,000 rows, so per-element pipeline overhead is paid
once per batch, not once per caption. Every step moves the rows it drops into ``batch.rejected`` with a reason,
so a batch always satisfies ``rows_read == live rows + rejected rows``.
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
import xxhash

from pipelines.balance.metaclip import is_kept, keep_probability
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


@dataclass
class PairBatch:
    batch_id: str
    uri: str
    rows_read: int = 0
    order: list = field(default_factory=list)
    urls: list = field(default_factory=list)
    captions: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    uids: list = field(default_factory=list)
    entry_ids: list = field(default_factory=list)
    lang: list = field(default_factory=list)
    lang_score: list = field(default_factory=list)
    lang_method: Counter = field(default_factory=Counter)
    rejected: list = field(default_factory=list)  # (uid, url, caption, reason, source)
    seconds: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.urls)

    def source(self, line: int) -> str:
        return f"{self.uri}:{line}"

    def keep_only(self, keep: Sequence[bool], reasons: Sequence[str | None]) -> None:
        """Move rows whose ``keep`` is False to ``rejected`` with their reason; keep the rest in order."""
        cols = ("order", "urls", "captions", "lines", "uids", "entry_ids", "lang", "lang_score")
        present = [c for c in cols if len(getattr(self, c)) == len(keep)]
        for i, k in enumerate(keep):
            if not k:
                self.rejected.append((self.uids[i], self.urls[i], self.captions[i], reasons[i],
                                      self.source(self.lines[i])))
        for c in present:
            values = getattr(self, c)
            setattr(self, c, [v for v, k in zip(values, keep) if k])


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
    live = pa.table({
        "order": pa.array(batch.order, pa.int64()), "url": pa.array(batch.urls, pa.string()),
        "caption": pa.array(batch.captions, pa.string()), "line": pa.array(batch.lines, pa.int64()),
        "uid": pa.array(batch.uids, pa.string()), "entry_ids": pa.array(batch.entry_ids or [[]] * n,
                                                                          pa.list_(pa.int32())),
        "lang": pa.array(batch.lang or [None] * n, pa.string()),
        "lang_score": pa.array(batch.lang_score or [None] * n, pa.float32()),
    }, schema=_SPILL_SCHEMA)
    return live, rejected_table(batch.rejected, with_stage=False)


def unspill(ref: "BatchRef", live: pa.Table, rejected: pa.Table) -> PairBatch:
    batch = PairBatch(batch_id=ref.batch_id, uri=ref.uri, rows_read=ref.rows_read)
    cols = live.to_pydict()
    batch.order, batch.urls, batch.captions = cols["order"], cols["url"], cols["caption"]
    batch.lines, batch.uids, batch.entry_ids = cols["line"], cols["uid"], cols["entry_ids"]
    if any(x is not None for x in cols["lang"]):
        batch.lang, batch.lang_score = cols["lang"], cols["lang_score"]
    r = rejected.to_pydict()
    batch.rejected = list(zip(r["uid"], r["url"], r["caption"], r["reason"], r["source"]))
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


def filter_batch(raw: RawBatch, params: CurateParams) -> PairBatch:
    """Read-level problems, caption filters and URL checks; computes the pair uid of every row that has one."""
    t0 = time.perf_counter()
    batch = PairBatch(batch_id=f"{raw.file_index:05d}-{raw.start:012d}", uri=raw.uri, rows_read=len(raw.urls))
    cfg = params.caption_cfg
    base = raw.file_index << ORDER_SHIFT
    for i, (url, caption) in enumerate(zip(raw.urls, raw.captions)):
        uid = F.pair_uid(url, caption) if url is not None and caption is not None else None
        reason = raw.bad.get(i) or F.check_caption(caption, cfg) or F.check_url(url)
        if reason:
            batch.rejected.append((uid, url, caption, reason, f"{raw.uri}:{raw.rows[i]}"))
            continue
        batch.order.append(base | (raw.start + i))
        batch.urls.append(url.strip())
        batch.captions.append(caption)
        batch.lines.append(raw.rows[i])
        batch.uids.append(uid)
    batch.seconds["filters"] += time.perf_counter() - t0
    return batch


# ---------------------------------------------------------------------------------------------- match


def match_batch(batch: PairBatch, matcher) -> PairBatch:
    t0 = time.perf_counter()
    ids = matcher.match_many(batch.captions)
    batch.entry_ids = ids
    keep = [bool(x) for x in ids]
    if not all(keep):
        batch.keep_only(keep, [None if k else F.NO_MATCH for k in keep])
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
    # Two independent 64-bit hashes of the URL: a false duplicate needs both to collide (~2**-128).
    hi = np.fromiter((_xxh(u, 1) for u in batch.urls), np.uint64, len(batch))
    lo = np.fromiter((_xxh(u, 2) for u in batch.urls), np.uint64, len(batch))
    cap = np.fromiter((_xxh(c, 3) for c in batch.captions), np.uint64, len(batch))
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
        reasons = [lost.get(o) for o in batch.order]
        batch.keep_only([r is None for r in reasons], reasons)
    return batch


# ---------------------------------------------------------------------------------------------- language


def language_batch(batch: PairBatch, identifier, params: CurateParams) -> PairBatch:
    t0 = time.perf_counter()
    results = identifier.detect(batch.captions)
    batch.lang = [r[0] for r in results]
    batch.lang_score = [r[1] for r in results]
    batch.lang_method.update(r[2] for r in results)
    allowed = set(params.langs)
    reasons = []
    for lang, score, _m in results:
        if allowed and lang not in allowed:
            reasons.append(F.WRONG_LANGUAGE)
        elif score < params.min_lang_score:
            reasons.append(F.LOW_LANG_SCORE)
        else:
            reasons.append(None)
    if any(reasons):
        batch.keep_only([r is None for r in reasons], reasons)
    batch.seconds["language"] += time.perf_counter() - t0
    return batch


# ---------------------------------------------------------------------------------------------- counting


def partial_counts(batch: PairBatch) -> tuple[np.ndarray, np.ndarray]:
    """(entry ids, counts) of this batch's live rows."""
    if not len(batch):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = np.fromiter((e for ids in batch.entry_ids for e in ids), np.int64)
    ids, counts = np.unique(flat, return_counts=True)
    return ids, counts.astype(np.int64)


def sample_keys(batch: PairBatch, seed: int) -> list[tuple[int, tuple[int, ...]]]:
    """(hash of uid, entry ids) per live row: the input of the bottom-k sample that sizes ``t`` for a target."""
    return [(_h64(f"{seed}:{uid}", b"sample"), tuple(ids)) for uid, ids in zip(batch.uids, batch.entry_ids)]


# ---------------------------------------------------------------------------------------------- balance


def balance_batch(batch: PairBatch, counts: np.ndarray, t: float, params: CurateParams) -> tuple[pa.Table, pa.Table]:
    """Keep probability per row from the global counts, the per-uid draw, and the two output tables."""
    t0 = time.perf_counter()
    probs = [keep_probability(ids, counts, t) for ids in batch.entry_ids]
    if params.balance:
        keep = [is_kept(params.seed, uid, p) for uid, p in zip(batch.uids, probs)]
        batch.keep_only(keep, [None if k else F.NOT_SAMPLED for k in keep])
        probs = [p for p, k in zip(probs, keep) if k]
    candidates = pa.table({
        "uid": pa.array(batch.uids, pa.string()),
        "url": pa.array(batch.urls, pa.string()),
        "caption": pa.array(batch.captions, pa.string()),
        "entry_ids": pa.array(batch.entry_ids, pa.list_(pa.int32())),
        "lang": pa.array(batch.lang, pa.string()),
        "lang_score": pa.array(batch.lang_score, pa.float32()),
        "keep_prob": pa.array(probs, pa.float64()),
    })
    candidates = conform(candidates, candidate_schema.SCHEMA, where=f"candidates of batch {batch.batch_id}")
    rejected = rejected_table(batch.rejected)
    batch.seconds["balance"] += time.perf_counter() - t0
    return candidates, rejected


def rejected_table(rows: list[tuple], with_stage: bool = True) -> pa.Table:
    uid, url, caption, reason, source = (list(c) for c in zip(*rows)) if rows else ([], [], [], [], [])
    if not with_stage:
        return pa.table({"uid": pa.array(uid, pa.string()), "url": pa.array(url, pa.string()),
                         "caption": pa.array(caption, pa.string()), "reason": pa.array(reason, pa.string()),
                         "source": pa.array(source, pa.string())})
    table = pa.table({
        "uid": pa.array(uid, pa.string()),
        "url": pa.array(url, pa.string()),
        "caption": pa.array(caption, pa.string()),
        "stage": pa.array(["curate"] * len(uid), pa.string()),
        "reason": pa.array(reason, pa.string()),
        "source": pa.array(source, pa.string()),
    })
    return conform(table, rejected_schema.SCHEMA, where="rejected rows")


def batch_stats(batch: PairBatch, kept: int) -> dict:
    """Counts of one finished batch: rows read, kept, rejected per reason, language methods, seconds per step."""
    return {
        "input_rows": batch.rows_read,
        "kept": kept,
        "rejected": dict(Counter(r[3] for r in batch.rejected)),
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
