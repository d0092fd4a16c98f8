"""Multi-pattern substring matching of captions against a query list (MetaCLIP semantics) with Aho-Corasick.

One automaton over all spaced entries finds every occurrence, overlapping ones included, in a single pass over
the normalised caption; its result equals MetaCLIP's loop of ``" " + entry + " " in text`` over all entries.
"""
from __future__ import annotations

import pickle
from collections.abc import Sequence

import ahocorasick

from pipelines.curate.text import normalize, spaced_entry


class EntryMatcher:
    """Finds the ids of all query-list entries that occur in a caption.

    Entries that are identical strings share one automaton key whose value is the tuple of their ids, so a query
    list with repeated entries still reports every id (as the naive loop would).
    """

    def __init__(self, entries: Sequence[str]):
        self.n_entries = len(entries)
        ids_by_needle: dict[str, list[int]] = {}
        for entry_id, entry in enumerate(entries):
            if entry is None or entry == "":
                continue
            ids_by_needle.setdefault(spaced_entry(entry), []).append(entry_id)
        # A needle's value is its entry id, or -(k + 1) pointing at self._shared[k] when several entries are the
        # same string: plain ints keep the per-hit work to one set insertion.
        automaton = ahocorasick.Automaton()
        self._shared: list[tuple[int, ...]] = []
        for needle, ids in ids_by_needle.items():
            if len(ids) == 1:
                automaton.add_word(needle, ids[0])
            else:
                self._shared.append(tuple(ids))
                automaton.add_word(needle, -len(self._shared))
        automaton.make_automaton()
        self._automaton = automaton

    def _expand(self, found: set[int]) -> list[int]:
        if min(found) < 0:
            found = {i for v in found for i in ((v,) if v >= 0 else self._shared[-v - 1])}
        return sorted(found)

    def match_normalized(self, spaced_text: str) -> list[int]:
        """Sorted unique entry ids found in an already normalised text."""
        found = {v for _end, v in self._automaton.iter(spaced_text)}
        return self._expand(found) if found else []

    def match(self, text: str) -> list[int]:
        return self.match_normalized(normalize(text))

    def match_many(self, texts: Sequence[str]) -> list[list[int]]:
        it = self._automaton.iter
        expand = self._expand
        out = []
        for text in texts:
            found = {v for _end, v in it(normalize(text))}
            out.append(expand(found) if found else [])
        return out

    # The automaton pickles natively; keep the default protocol explicit so Beam can ship a matcher to workers.
    def __getstate__(self):
        return {"n_entries": self.n_entries, "shared": self._shared, "automaton": pickle.dumps(self._automaton)}

    def __setstate__(self, state):
        self.n_entries = state["n_entries"]
        self._shared = state["shared"]
        self._automaton = pickle.loads(state["automaton"])


def naive_match(text: str, entries: Sequence[str]) -> list[int]:
    """MetaCLIP's reference implementation: a Python loop over every entry (used by tests and benchmarks)."""
    spaced = normalize(text)
    return [i for i, entry in enumerate(entries) if entry and spaced_entry(entry) in spaced]
