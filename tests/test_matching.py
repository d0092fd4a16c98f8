"""MetaCLIP substring-matching semantics, pinned case by case and against the naive reference loop."""
import random

import pytest

from pipelines.curate.matching import EntryMatcher, naive_match
from pipelines.curate.text import normalize

ENTRIES = ["dog", "hot dog", "hot dog stand", "cat", "New York", "new york", "e.g.", "dog,", "a", "stand"]


@pytest.fixture(scope="module")
def matcher():
    return EntryMatcher(ENTRIES)


def ids_of(matcher, text):
    return [ENTRIES[i] for i in matcher.match(text)]


@pytest.mark.parametrize("text,expected", [
    ("hot dog stand", ["dog", "hot dog", "hot dog stand", "stand"]),  # overlapping entries all match
    ("dogs", []),  # no stemming
    ("(dog)", []),  # brackets are not spaced
    ("dog-friendly", []),  # hyphens are not spaced
    ("dog,", ["dog"]),  # comma is spaced, so the entry "dog," can never match
    ("a dog.", ["dog", "a"]),
    ("Dog", []),  # case-sensitive
    ("I love New York!", ["New York"]),
    ("new york?", ["new york"]),
    ("hot\tdog\nstand", ["dog", "hot dog", "hot dog stand", "stand"]),  # \t \n become spaces
    ("hot  dog", ["dog"]),  # two spaces: "hot dog" does not occur
    ("e.g. a dog", ["dog", "a"]),  # an entry with punctuation never matches
    ("catdog", []),
    ("`dog`", ["dog"]),  # backtick is spaced
    ("dog;cat:dog", ["dog", "cat"]),
    ("", []),
])
def test_semantics(matcher, text, expected):
    assert ids_of(matcher, text) == sorted(expected, key=ENTRIES.index)
    assert matcher.match(text) == naive_match(text, ENTRIES)


def test_normalize_exact():
    assert normalize("a,b.c;d:e?f!g`h\ti\nj\rk") == " a , b . c ; d : e ? f ! g ` h i j k "


def test_repeated_entries_keep_every_id():
    m = EntryMatcher(["dog", "cat", "dog"])
    assert m.match("a dog") == [0, 2]


def test_ids_sorted_unique_when_entry_occurs_twice(matcher):
    assert matcher.match("dog and dog and cat") == sorted(set(matcher.match("dog and dog and cat")))


def test_equals_naive_on_random_texts():
    rng = random.Random(7)
    vocab = ["dog", "hot", "cat", "stand", "New", "York", "a", ",", ".", "!", "?", ";", ":", "`", "x-y", "(dog)"]
    entries = sorted({" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3))) for _ in range(80)})
    m = EntryMatcher(entries)
    for _ in range(2000):
        sep = rng.choice([" ", "", "  ", "\t"])
        text = sep.join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        assert m.match(text) == naive_match(text, entries), text


def test_matcher_pickles(matcher):
    import pickle

    clone = pickle.loads(pickle.dumps(matcher))
    assert clone.match("hot dog stand") == matcher.match("hot dog stand")
