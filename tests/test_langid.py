"""Language ID backends and the English-lexicon shortcut (which must never claim a non-English caption)."""
import csv

import pytest

from pipelines.curate.langid import EnglishLexicon, LanguageIdentifier, make_backend

EN = ["the children are playing with their toys in the garden", "two people walking through the snowy forest"]
DE = ["ein Hund läuft am Strand entlang", "zwei Menschen gehen durch den verschneiten Wald"]
FR = ["un chien qui court sur la plage", "deux personnes marchent dans la forêt enneigée"]


@pytest.fixture(scope="module")
def lexicon():
    return EnglishLexicon.cached()


@pytest.mark.parametrize("name", ["py3langid", "langdetect"])
def test_backends(name):
    backend = make_backend(name, seed=0)
    langs = [lang for lang, _score in backend.detect(EN + DE + FR)]
    assert langs == ["en"] * 2 + ["de"] * 2 + ["fr"] * 2
    assert backend.detect(EN) == make_backend(name, seed=0).detect(EN)  # deterministic


def test_langdetect_handles_featureless_text():
    assert make_backend("langdetect").detect(["1234 5678"])[0][0] == "und"


def test_shortcut(lexicon):
    ident = LanguageIdentifier(make_backend("py3langid"), lexicon)
    out = ident.detect(EN + DE + FR)
    assert [o[2] for o in out[:2]] == ["lexicon", "lexicon"]
    assert all(o[2] == "py3langid" for o in out[2:])
    assert [o[0] for o in out] == ["en"] * 2 + ["de"] * 2 + ["fr"] * 2


def test_shortcut_never_fires_on_multi30k_translations(lexicon, shared_data):
    with open(shared_data / "captions" / "multi30k-en-de-fr-cs.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:5000]
    for lang in ("de", "fr", "cs"):
        fired = [r[lang] for r in rows if lexicon.is_english(r[lang])]
        assert fired == [], (lang, fired[:5])
    assert sum(lexicon.is_english(r["en"]) for r in rows) > 0.5 * len(rows)
