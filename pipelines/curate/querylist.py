"""Query lists: build from offline sources, load, hash and describe (CLIP's 500,000 queries; MetaCLIP metadata).

Sources, in the order their entries get ids (an entry keeps the id and source of its first occurrence):
``user`` term files, ``wordnet`` lemma names (from a WordNet database directory), ``wordfreq`` English unigrams by
frequency (a stand-in for "words occurring >= 100 times in Wikipedia"), ``wordfreq_capitalized`` (capitalised
forms of the most frequent unigrams: matching is case-sensitive, so "Paris" and "paris" are different entries),
and ``bigram_pmi`` (high-PMI word pairs computed from a caption corpus).
"""
from __future__ import annotations

from pipelines.core.errors import ClipError

import gzip
import hashlib
import io
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import conform
from schemas import querylist as ql_schema

WORDNET_INDEX_FILES = ("index.noun", "index.verb", "index.adj", "index.adv")


class QueryListError(ClipError, ValueError):
    """A user-facing problem with a query list file or a source."""


@dataclass(frozen=True)
class QueryList:
    entries: tuple[str, ...]
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def content_hash(self) -> str:
        """sha256 over the entries in id order (sources do not change what is matched)."""
        h = hashlib.sha256()
        for entry in self.entries:
            h.update(entry.encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def to_table(self) -> pa.Table:
        table = pa.table({"entry_id": pa.array(range(len(self.entries)), pa.int32()),
                          "entry": pa.array(self.entries, pa.string()),
                          "source": pa.array(self.sources, pa.string())})
        table = conform(table, ql_schema.SCHEMA, where="querylist")
        md = dict(table.schema.metadata)
        md[b"clipline.querylist.sha256"] = self.content_hash.encode()
        return table.replace_schema_metadata(md)


def from_sources(sources: Iterable[tuple[str, Iterable[str]]]) -> QueryList:
    """Merge (source name, entries) lists in order, dropping empty entries and repeats of earlier ones."""
    seen: dict[str, str] = {}
    for name, items in sources:
        for item in items:
            entry = item.strip()
            if entry and entry not in seen:
                seen[entry] = name
    return QueryList(tuple(seen), tuple(seen.values()))


def wordfreq_unigrams(n: int | None = None, min_zipf: float = 0.0, lang: str = "en") -> list[str]:
    """Words by descending frequency from wordfreq's 'large' list (alphabetic-or-apostrophe/hyphen only)."""
    import wordfreq

    words = wordfreq.top_n_list(lang, n or 10_000_000, wordlist="large")
    out = []
    for word in words:
        if min_zipf and wordfreq.zipf_frequency(word, lang, wordlist="large") < min_zipf:
            break
        if any(ch.isalpha() for ch in word) and all(ch.isalnum() or ch in "'-" for ch in word):
            out.append(word)
    return out


def capitalized(words: Sequence[str], n: int) -> list[str]:
    return [w[:1].upper() + w[1:] for w in words[:n] if w[:1].isalpha() and w[:1].upper() != w[:1]]


def wordnet_lemmas(wordnet_dir: str) -> list[str]:
    """Lemma names from a WordNet database directory (index.noun/verb/adj/adv), underscores as spaces."""
    found = [os.path.join(wordnet_dir, f) for f in WORDNET_INDEX_FILES if os.path.exists(os.path.join(wordnet_dir, f))]
    if not found:
        raise QueryListError(f"{wordnet_dir}: not a WordNet database directory (expected one of "
                             f"{', '.join(WORDNET_INDEX_FILES)})")
    lemmas: list[str] = []
    for path in found:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if line.startswith("  ") or not line.strip():
                    continue  # the licence header lines start with two spaces
                lemma = line.split(" ", 1)[0]
                if not lemma:
                    raise QueryListError(f"{path}:{line_no}: expected a lemma at the start of the line")
                lemmas.append(lemma.replace("_", " "))
    return lemmas


def pmi_bigrams(captions: Iterable[str], *, min_count: int = 5, min_pmi: float = 3.0,
                top_k: int | None = None) -> list[str]:
    """Bigrams of adjacent tokens (MetaCLIP-normalised, whitespace-split) ranked by pointwise mutual information.

    PMI(x, y) = log(p(x y) / (p(x) p(y))); pairs seen fewer than ``min_count`` times are ignored (PMI favours rare
    pairs), punctuation tokens never form a bigram.
    """
    from pipelines.curate.text import PUNCTS_TO_WRAP, normalize

    punct = set(PUNCTS_TO_WRAP)
    unigrams: Counter = Counter()
    bigrams: Counter = Counter()
    for caption in captions:
        if not caption:
            continue
        tokens = normalize(caption).split()
        unigrams.update(tokens)
        bigrams.update((a, b) for a, b in zip(tokens, tokens[1:]) if a not in punct and b not in punct)
    n_uni = sum(unigrams.values())
    n_bi = sum(bigrams.values())
    if not n_bi:
        return []
    scored = []
    for (a, b), c in bigrams.items():
        if c < min_count:
            continue
        pmi = math.log((c / n_bi) / ((unigrams[a] / n_uni) * (unigrams[b] / n_uni)))
        if pmi >= min_pmi:
            scored.append((-pmi, -c, f"{a} {b}"))
    scored.sort()
    picked = [s for _p, _c, s in scored]
    return picked[:top_k] if top_k else picked


def read_term_file(path: str) -> list[str]:
    """One entry per line (UTF-8; blank lines skipped)."""
    try:
        raw = _read_bytes(path)
    except FileNotFoundError:
        raise QueryListError(f"{path}: no such file") from None
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise QueryListError(f"{path}: line {line}: not valid UTF-8 (a term list is UTF-8 text, one entry "
                             f"per line)") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_bytes(path: str) -> bytes:
    if path.startswith("s3://"):
        from pipelines.core import storage

        try:
            return storage.read_bytes(path)
        except storage.StorageError as exc:
            raise QueryListError(str(exc)) from None
    with open(path, "rb") as f:
        return f.read()


def load(path: str) -> QueryList:
    """A query list from Parquet (entry_id, entry, source) or a plain text file (one entry per line)."""
    if not path.startswith("s3://") and not os.path.exists(path):
        raise QueryListError(f"{path}: no such query list file")
    if path.endswith((".parquet", ".pq")):
        try:
            table = pq.read_table(io.BytesIO(_read_bytes(path)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise QueryListError(f"{path}: not a readable Parquet file ({exc})") from None
        for col in ("entry_id", "entry"):
            if col not in table.column_names:
                raise QueryListError(f"{path}: no column {col!r} (found: {', '.join(table.column_names)}); a query "
                                     f"list has entry_id, entry, source")
        table = table.sort_by("entry_id")
        ids = table.column("entry_id").to_pylist()
        if ids != list(range(len(ids))):
            bad = next(i for i, v in enumerate(ids) if v != i)
            raise QueryListError(f"{path}: entry_id must be dense from 0; row {bad} has {ids[bad]}")
        entries = table.column("entry").to_pylist()
        if any(e is None for e in entries):
            raise QueryListError(f"{path}: entry {entries.index(None)} is null")
        sources = (table.column("source").to_pylist() if "source" in table.column_names else ["file"] * len(entries))
        return QueryList(tuple(entries), tuple(s or "file" for s in sources))
    entries = read_term_file(path)
    if not entries:
        raise QueryListError(f"{path}: empty query list (expected one entry per line)")
    return QueryList(tuple(entries), tuple(["file"] * len(entries)))


def save(qlist: QueryList, path: str) -> None:
    """Write atomically (temp file + rename)."""
    sink = pa.BufferOutputStream()
    pq.write_table(qlist.to_table(), sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    from pipelines.core import storage

    storage.write_bytes_atomic(path, data)


def stats(qlist: QueryList) -> dict:
    by_source = Counter(qlist.sources)
    words = Counter(min(len(e.split()), 4) for e in qlist.entries)
    lengths = sorted(len(e) for e in qlist.entries) or [0]
    return {
        "entries": len(qlist),
        "sha256": qlist.content_hash,
        "by_source": dict(sorted(by_source.items(), key=lambda kv: -kv[1])),
        "by_words": {("4+" if k == 4 else str(k)): v for k, v in sorted(words.items())},
        "chars": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
        "with_punctuation": sum(1 for e in qlist.entries if any(p in e for p in ",.;:?!`")),
    }
