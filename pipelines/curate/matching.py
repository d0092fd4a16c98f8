"""Multi-pattern substring matching of captions against a query list (MetaCLIP semantics), vectorised.

MetaCLIP matches an entry E when ``" " + E + " "`` occurs in the normalised caption T. Such an occurrence starts
and ends at a space of T, so it is exactly a run of consecutive tokens of ``T.split(" ")`` (empty tokens included:
two spaces in a row give one) lying between two separators, joined back with single spaces. Matching is therefore
an exact lookup of token windows in a dict of the entries, which a batch does with Arrow kernels: split every
normalised caption on " ", dictionary-encode the tokens, look the batch's *distinct* tokens up in the entry dict,
and grow multi-token windows only from positions whose window so far is a prefix of some longer entry, by a token
that occurs after the first token of some entry (a trie over tokens, one vectorised step per extra token). The
result equals MetaCLIP's loop of ``" " + entry + " " in text`` over all entries (tested against it), at a cost
that grows with the batch's tokens, not with the list's size.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.curate.text import normalize, normalize_core_arrow, spaced_entry

_MISS = np.iinfo(np.int64).min  # "no entry" in a code array


class EntryMatcher:
    """Finds the ids of all query-list entries that occur in a caption.

    Entries that are identical strings share one code whose value points at the tuple of their ids, so a query
    list with repeated entries still reports every id (as the naive loop would).
    """

    def __init__(self, entries: Sequence[str]):
        self.n_entries = len(entries)
        # An entry's code is its id, or -(k + 1) pointing at self._shared[k] when several entries are the same
        # string. Prefixes: every "t1 t2 .. tk" (k < n) of an entry of n >= 2 space-separated tokens.
        self._shared: list[tuple[int, ...]] = []
        code = dict(zip(entries, range(self.n_entries)))  # the common case: every entry distinct
        if len(code) != self.n_entries:  # repeated entries (or several empty ones)
            ids_by_entry: dict[str, list[int]] = {}
            for entry_id, entry in enumerate(entries):
                ids_by_entry.setdefault(entry, []).append(entry_id)
            code = {}
            for entry, ids in ids_by_entry.items():
                if len(ids) == 1:
                    code[entry] = ids[0]
                else:
                    self._shared.append(tuple(ids))
                    code[entry] = -len(self._shared)
        code.pop("", None)
        code.pop(None, None)
        self._code: dict[str, int] = code
        self._prefixes: set[str] = set()
        self._follow: set[str] = set()  # tokens that come 2nd, 3rd, ... in some entry
        for entry in [e for e in code if " " in e]:
            self._follow.update(entry.split(" ")[1:])
            cut = entry.rfind(" ")
            while cut >= 0:
                prefix = entry[:cut]
                if prefix in self._prefixes:
                    break  # its own prefixes are in already
                self._prefixes.add(prefix)
                cut = prefix.rfind(" ")

    # ------------------------------------------------------------------------------------------ one text

    def _expand(self, found: set[int]) -> list[int]:
        if min(found) < 0:
            found = {i for v in found for i in ((v,) if v >= 0 else self._shared[-v - 1])}
        return sorted(found)

    def match_normalized(self, spaced_text: str) -> list[int]:
        """Sorted unique entry ids found in an already normalised text (any string: ``" " + E + " "`` in it)."""
        tokens = spaced_text.split(" ")[1:-1]  # the tokens that lie between two spaces
        code, prefixes = self._code, self._prefixes
        found = set()
        n = len(tokens)
        for i in range(n):
            window = tokens[i]
            j = i
            while True:
                v = code.get(window)
                if v is not None:
                    found.add(v)
                j += 1
                if j >= n or window not in prefixes:
                    break
                window = f"{window} {tokens[j]}"
        return self._expand(found) if found else []

    def match(self, text: str) -> list[int]:
        return self.match_normalized(normalize(text))

    # ------------------------------------------------------------------------------------------ a batch

    def match_many(self, texts: Sequence[str]) -> list[list[int]]:
        import pyarrow as pa

        try:
            arr = pa.array(list(texts), pa.string())
        except (pa.ArrowException, UnicodeEncodeError, TypeError):  # e.g. lone surrogates: one text at a time
            return [self.match(t) for t in texts]
        if arr.null_count:
            return [self.match(t) for t in texts]
        return self.match_arrow(arr).to_pylist()

    def _lookup(self, strings, follow: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(code or _MISS, is a prefix of a longer entry, [comes after the first token of some entry]) per string
        of an Arrow string array; every distinct string is looked up once."""
        import pyarrow as pa
        import pyarrow.compute as pc

        enc = pc.dictionary_encode(strings)
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        uniq = enc.dictionary.to_pylist()
        get, prefixes = self._code.get, self._prefixes
        codes_u = np.fromiter((get(u, _MISS) for u in uniq), np.int64, len(uniq))
        idx = enc.indices.to_numpy(zero_copy_only=False)
        if not prefixes:
            return codes_u[idx], np.zeros(len(idx), np.bool_), None
        pref_u = np.fromiter((u in prefixes for u in uniq), np.bool_, len(uniq))
        if not follow:
            return codes_u[idx], pref_u[idx], None
        fol = self._follow
        follow_u = np.fromiter((u in fol for u in uniq), np.bool_, len(uniq))
        return codes_u[idx], pref_u[idx], follow_u[idx]

    def match_arrow(self, captions):
        """Entry ids of every caption of a pyarrow string array without nulls, as a ``list<int32>`` array (sorted,
        unique per row): the same as ``[self.match(c) for c in captions]``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        n_rows = len(captions)
        if n_rows == 0:
            return pa.array([], pa.list_(pa.int32()))
        lists = pc.split_pattern(normalize_core_arrow(captions), " ")
        flat = pc.list_flatten(lists)
        parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        n_tok = len(flat)
        rows_hit, codes_hit = [], []
        if n_tok:
            codes, is_prefix, follows = self._lookup(flat, follow=True)
            hit = codes != _MISS
            rows_hit.append(parent[hit])
            codes_hit.append(codes[hit])
            # Grow windows of k+1 tokens from windows of k tokens that are prefixes of a longer entry.
            start = np.nonzero(is_prefix)[0]
            windows = flat.take(pa.array(start)) if len(start) else None
            end = start
            while len(start):
                nxt = end + 1
                ok = nxt < n_tok
                ok[ok] = (parent[nxt[ok]] == parent[start[ok]]) & follows[nxt[ok]]  # same caption, a possible token
                if not ok.all():
                    start, end, nxt = start[ok], end[ok], nxt[ok]
                    windows = windows.filter(pa.array(ok))
                if not len(start):
                    break
                windows = pc.binary_join_element_wise(windows, flat.take(pa.array(nxt)), " ")
                end = nxt
                codes, is_prefix, _ = self._lookup(windows)
                hit = codes != _MISS
                rows_hit.append(parent[start[hit]])
                codes_hit.append(codes[hit])
                if not is_prefix.all():
                    start, end = start[is_prefix], end[is_prefix]
                    windows = windows.filter(pa.array(is_prefix))
        rows = np.concatenate(rows_hit) if rows_hit else np.zeros(0, np.int64)
        vals = np.concatenate(codes_hit) if codes_hit else np.zeros(0, np.int64)
        shared = vals < 0
        if shared.any():  # repeated entries: one hit stands for every id of that string
            extra_rows, extra_vals = [], []
            for r, v in zip(rows[shared].tolist(), vals[shared].tolist()):
                ids = self._shared[-v - 1]
                extra_rows.extend([r] * len(ids))
                extra_vals.extend(ids)
            rows = np.concatenate([rows[~shared], np.asarray(extra_rows, np.int64)])
            vals = np.concatenate([vals[~shared], np.asarray(extra_vals, np.int64)])
        width = max(1, self.n_entries)
        keys = np.sort(rows * width + vals)  # by row, then id
        if len(keys) > 1:  # drop repeats (an entry found twice in one caption); np.sort beats np.unique's hash
            keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        rows, ids = keys // width, keys % width
        offsets = np.zeros(n_rows + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids.astype(np.int32)))

    # A matcher pickles as its dicts (Beam may ship one to workers).
    def __getstate__(self):
        return {"n_entries": self.n_entries, "shared": self._shared, "code": self._code, "prefixes": self._prefixes,
                "follow": self._follow}

    def __setstate__(self, state):
        self.n_entries = state["n_entries"]
        self._shared = state["shared"]
        self._code = state["code"]
        self._prefixes = state["prefixes"]
        self._follow = state["follow"]


def naive_match(text: str, entries: Sequence[str]) -> list[int]:
    """MetaCLIP's reference implementation: a Python loop over every entry (used by tests and benchmarks)."""
    spaced = normalize(text)
    return [i for i, entry in enumerate(entries) if entry and spaced_entry(entry) in spaced]
