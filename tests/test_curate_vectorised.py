"""The vectorised curation steps give exactly what the per-row reference functions give: caption and URL checks,
pair uids, MetaCLIP matching, the English-lexicon shortcut, keep probabilities and draws, the spill round trip,
and the whole stage against a plain per-row reimplementation of it (dedup on and off)."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.balance import metaclip as B
from pipelines.curate import filters as F
from pipelines.curate import querylist as QL
from pipelines.curate import steps as S
from pipelines.curate.langid import EnglishLexicon, LanguageIdentifier, make_backend
from pipelines.curate.matching import EntryMatcher, naive_match
from pipelines.curate.readers import RawBatch
from pipelines.curate.stage import run_curate

ODD_CAPTIONS = [
    None, "", " ", "   ", "\t", "\n", "a", "ab", "abcd", "abcde", "a b", "ab cd", " ab cd ", "a  b c", "a\tb c",
    "hello world", "x" * 1000, "x" * 1001, "a " * 200, "a " * 201, ("a " * 200).strip(), ("a " * 201).strip(),
    "12345 67890", "!!! ???", "__ __", "1a 2b", "bad \ufffd char", "nul\x00in it", "ctrl\x01 char", "del\x7f char",
    "zero\u200bwidth space", "nbsp\u00a0here ok", "\u00a0lead nbsp", "line\u2028sep", "next\x85line", "fs\x1cx yz",
    "café au lait", "Ὀδυσσεύς sails", "日本語 テキスト", "emoji 🐶 dog", "ok, fine. yes", "tab\tinside words",
    "trailing space ", " leading space", "Mixed CASE Words", "it's a dog's life", "'quoted' words",
]
ODD_URLS = [
    None, "", " ", "http://a.com/x.jpg", "https://a.com/x.jpg", "HTTP://A.COM/X.JPG", "hTtPs://a.b.c/d?e=f#g",
    "ftp://a.com/x", "http//a.com", "http:/a.com/x", "http://", "http:///x", "http://a.com", "http://a.com/",
    "http://a.com?q", "http://a.com#f", "http://a.com:80/x", "http://a.com:8080/x", "http://a.com:65535/x",
    "http://a.com:65536/x", "http://a.com:/x", "http://a.com:abc/x", "http://a.com:99999999/x",
    "http://user@a.com/x", "http://user:pw@a.com:81/x", "http://[::1]/x", "http://[::1]:80/x", "http://[zz]/x",
    "http://[::1/x", "http://::1]/x", "http://1.2.3.4/x", "http://a..com/x", "http://.a.com/x", "http://a.com./x",
    "http://a.com../x", "http://-a-.com/x", "http://a_b.com/x", "http://a!b.com/x", "http://a b.com/x",
    "http://a.com/b c", "http://a.com/b\tc", " http://a.com/x", "http://a.com/x ", "\thttp://a.com/x\n",
    "http://" + "l" * 63 + ".com/x", "http://" + "l" * 64 + ".com/x", "http://" + ".".join(["abc"] * 60) + "/x",
    "http://" + ".".join(["abcd"] * 60) + "/x", "http://bücher.de/x", "http://a.com/ü", "http://a.com/\ufffd",
    "http://a%41.com/x", "http://a.com/%20x", "javascript:alert(1)", "data:image/png;base64,AA", "//a.com/x",
    "mailto:a@b.c", "http://a.com\\x", "http://a.com/x\x00y", "https://a.com/" + "p" * 3000,
]


def _random_text(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def _caption_cases(rng):
    alphabet = "abcXYZ019 .,;'\t\n\x00\x1f\x7f\u00e9\u00a0\u200b\ufffd\u2028Σ"
    return ODD_CAPTIONS + [_random_text(rng, alphabet, 14) for _ in range(3000)]


def _url_cases(rng):
    parts = ["http", "https", "HTTP", "ftp", "://", ":", "/", "//", "?", "#", "@", "[", "]", ".", "a", "b1", "-",
             "_", " ", "\t", "80", "99999", "ü", "%", "x"]
    return ODD_URLS + ["".join(rng.choice(parts) for _ in range(rng.randint(0, 10))) for _ in range(3000)] + \
        ["http://" + "".join(rng.choice(parts[14:]) for _ in range(rng.randint(0, 8))) for _ in range(3000)]


@pytest.mark.parametrize("cfg", [F.CaptionFilterConfig(), F.CaptionFilterConfig(3, 8, 40, 5),
                                 F.CaptionFilterConfig(0, 0, 1000, 200), F.CaptionFilterConfig(1, 1, 2, 1)])
def test_caption_fast_path_only_clears_rows_the_check_keeps(cfg):
    cases = _caption_cases(random.Random(1))
    fast = F.caption_ok_fast(pa.array(cases, pa.string()), cfg)
    for c, ok in zip(cases, fast.tolist()):
        if ok:
            assert F.check_caption(c, cfg) is None, repr(c)
    # and it does clear ordinary captions (else nothing would be vectorised)
    ordinary = ["a dog on the beach", "two cats , sleeping", "photo of a red car at night"]
    assert F.caption_ok_fast(pa.array(ordinary), F.CaptionFilterConfig()).all()


def test_url_fast_path_only_clears_urls_the_check_keeps():
    cases = _url_cases(random.Random(2))
    fast = F.url_ok_fast(pa.array(cases, pa.string()))
    for u, ok in zip(cases, fast.tolist()):
        if ok:
            assert F.check_url(u) is None and u.strip() == u, repr(u)
    ordinary = ["http://a.com/x.jpg", "https://img.example.org:8443/p/q.png?w=1#f", "HTTPS://A-B.C_D.com./x"]
    assert F.url_ok_fast(pa.array(ordinary)).all()


def _adversarial_raw(seed: int, n: int = 1500) -> RawBatch:
    rng = random.Random(seed)
    caps, urls = _caption_cases(rng), _url_cases(rng)
    good_caps = ["a dog on the beach", "the red car , parked", "ein Hund im Park", "a cat"]
    raw = RawBatch(3, "mem://in.tsv", 40)
    for i in range(n):
        raw.urls.append(rng.choice(urls) if rng.random() < 0.5 else f"http://h{i % 9}.com/{i}.jpg")
        raw.captions.append(rng.choice(caps) if rng.random() < 0.5 else rng.choice(good_caps))
        raw.rows.append(2 * i + 3)
    # read-level problems, marked by the reader (which repairs undecodable bytes to U+FFFD)
    raw.bad[5] = F.INVALID_UTF8
    raw.urls[5], raw.captions[5] = "http://a.com/\ufffd.jpg", "bad \ufffd bytes"
    raw.bad[7] = F.MALFORMED_RECORD
    raw.urls[7], raw.captions[7] = "http://a.com/7.jpg", None
    return raw


def _batch_tables(batch: S.PairBatch):
    live, rejected = S.spill_tables(batch)
    return live.to_pydict(), rejected.to_pydict()


@pytest.mark.parametrize("params", [S.CurateParams(), S.CurateParams(min_words=3, min_chars=9, max_chars=60,
                                                                     max_words=6)])
def test_filter_batch_equals_per_row_reference(params):
    raw = _adversarial_raw(3)
    got = S.filter_batch(raw, params)
    ref = S._filter_batch_rows(_adversarial_raw(3), params)
    assert _batch_tables(got) == _batch_tables(ref)
    live, rejected = _batch_tables(got)
    assert len(live["uid"]) + len(rejected["uid"]) == got.rows_read == 1500
    assert 0 < len(rejected["uid"]) < 1500
    i = rejected["source"].index("mem://in.tsv:13")
    assert rejected["uid"][i] == F.pair_uid("http://a.com/\ufffd.jpg", "bad \ufffd bytes")
    assert rejected["reason"][i] == F.INVALID_UTF8


def test_filter_batch_from_arrow_columns_equals_lists():
    rng = random.Random(4)
    caps = [c for c in _caption_cases(rng)][:500]
    urls = [rng.choice(_url_cases(rng)) for _ in caps]
    rows = range(11, 11 + len(caps))
    from_lists = S.filter_batch(RawBatch(0, "f.parquet", 10, urls=list(urls), captions=list(caps), rows=list(rows)),
                                S.CurateParams())
    from_arrays = S.filter_batch(RawBatch(0, "f.parquet", 10, rows=rows,
                                          arrays=(pa.array(urls, pa.string()), pa.array(caps, pa.string()))),
                                 S.CurateParams())
    assert _batch_tables(from_lists) == _batch_tables(from_arrays)
    # a RawBatch built from arrays still offers the lists
    rb = RawBatch(0, "f.parquet", 0, rows=range(1, 3), arrays=(pa.array(["u1", None]), pa.array(["c1", "c2"])))
    assert (rb.urls, rb.captions, len(rb)) == (["u1", None], ["c1", "c2"], 2)


def _random_entries_and_texts(seed: int):
    rng = random.Random(seed)
    vocab = ["dog", "hot", "cat", "", " ", "  ", "a", ",", ".", "New", "York", "x-y", "é", "\t", "dog ", " dog",
             "hot  dog", "Σ", "`", "d\u00a0g"]
    entries = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 4))) for _ in range(80)]
    entries += ["dog", "dog", "hot dog", "hot dog stand", "", None, "a dog , a"]
    texts = ["".join(rng.choice(vocab + [" ", " ", "  ", "\n", ",", "!"]) for _ in range(rng.randint(0, 16)))
             for _ in range(600)]
    return entries, texts


@pytest.mark.parametrize("seed", range(6))
def test_matching_batch_equals_naive_loop(seed):
    entries, texts = _random_entries_and_texts(seed)
    m = EntryMatcher(entries)
    expected = [naive_match(t, entries) for t in texts]
    assert m.match_arrow(pa.array(texts, pa.string())).to_pylist() == expected
    assert m.match_many(texts) == expected
    assert [m.match(t) for t in texts] == expected
    assert sum(1 for e in expected if e) > 50  # the random texts do match


def test_matching_batch_type_and_empty():
    m = EntryMatcher(["dog", "hot dog"])
    out = m.match_arrow(pa.array(["a hot dog", "nothing", ""]))
    assert out.type == pa.list_(pa.int32()) and out.to_pylist() == [[0, 1], [], []]
    assert m.match_arrow(pa.array([], pa.string())).to_pylist() == []
    assert EntryMatcher([]).match_arrow(pa.array(["dog"])).to_pylist() == [[]]


@pytest.fixture(scope="module")
def lexicon():
    return EnglishLexicon.cached()


LANG_TEXTS = [
    "the children are playing with their toys in the garden", "ein Hund läuft am Strand entlang",
    "two people walking through the snowy forest", "it's a dog's life in the city", "'the' 'dog' 'runs'",
    "THE DOG RUNS ON THE BEACH", "the dog-friendly beach at night", "the dog , the cat ; the bird",
    "ΟΔΟΣ the road", "the café near the river", "", "1234 5678", "the the", "dog dog dog dog", "the\tdog\nruns",
    "photo of the city at night", "the 2 dogs and the 3 cats", "the dogs' toys", "don't stop the music",
    "x" * 50, "the " * 300, "naïve people in the street",
]


def test_lexicon_vectorised_equals_per_text(lexicon):
    rng = random.Random(5)
    words = ["the", "dog", "of", "and", "Hund", "der", "it's", "'", "-", ",", "2", "café", "Σ", "THE", "people",
             "photo", "with", "la", "plage", "walking", "garden", "l'eau", "isn't", "o'clock"]
    texts = LANG_TEXTS + [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    got = lexicon.is_english_arrow(pa.array(texts, pa.string()))
    assert got.tolist() == [lexicon.is_english(t) for t in texts]
    assert 0 < got.sum() < len(texts)


def test_detect_arrow_equals_detect(lexicon):
    ident = LanguageIdentifier(make_backend("py3langid"), lexicon)
    texts = LANG_TEXTS + ["un chien qui court sur la plage", "deux personnes marchent dans la forêt"]
    langs, scores, methods = ident.detect_arrow(pa.array(texts, pa.string()))
    assert list(zip(langs, scores, methods)) == ident.detect(texts)
    no_lex = LanguageIdentifier(make_backend("py3langid"), None)
    langs, scores, methods = no_lex.detect_arrow(pa.array(texts, pa.string()))
    assert list(zip(langs, scores, methods)) == no_lex.detect(texts)


def test_keep_probabilities_and_draws_are_bit_identical_to_metaclip():
    rng = np.random.default_rng(6)
    counts = rng.integers(1, 60_000, 500).astype(np.int64)
    counts[:5] = [1, 19_999, 20_000, 20_001, 10**9]
    lists = [sorted(set(rng.integers(0, 500, rng.integers(0, 12)).tolist())) for _ in range(4000)]
    lists += [[0, 1, 2, 3, 4], [4], [], [2, 3]]
    arr = pa.array(lists, pa.list_(pa.int32()))
    for t in (20_000.0, 1.0, 333.3, 1e12):
        got = S.keep_probabilities(arr, counts, t)
        want = np.array([B.keep_probability(ids, counts, t) for ids in lists], np.float64)
        assert got.tobytes() == want.tobytes()
    uids = [f"{rng.integers(0, 2**63):032x}" for _ in range(20_000)] + ["", "0" * 32, "f" * 32]
    for seed in (0, 7):
        got = S.uniform_draws(seed, uids)
        want = np.array([B.uniform_draw(seed, u) for u in uids], np.float64)
        assert got.tobytes() == want.tobytes()


def test_spill_round_trip_and_counts():
    params = S.CurateParams()
    batch = S.filter_batch(_adversarial_raw(8), params)
    batch = S.match_batch(batch, EntryMatcher(["dog", "cat", "the red car", "beach", "Hund"]))
    live, rejected = S.spill_tables(batch)
    back = S.unspill(S.BatchRef.of(batch), pa.table(live.to_pydict(), schema=live.schema), rejected)
    assert _batch_tables(back) == _batch_tables(batch) and back.lang is None
    ids, counts = S.partial_counts(batch)
    expected = Counter(e for row in batch.entry_ids.to_pylist() for e in row)
    assert dict(zip(ids.tolist(), counts.tolist())) == dict(expected) and len(expected) >= 3


# ------------------------------------------------------------------------------- the stage vs a per-row model


ENTRIES = ["dog", "cat", "hot dog", "red", "car", "tree", "house", "bird", "beach", "city", "Hund"]


def _rows(n=2500, seed=9):
    rng = random.Random(seed)
    words = ["the", "a", "small", "happy", "old", "picture", "of", "near", "with", "running", "photo", ","]
    rows = []
    for i in range(n):
        k = min(int(rng.paretovariate(1.1)) - 1, len(ENTRIES) - 1)
        ws = [rng.choice(words) for _ in range(rng.randint(1, 6))] + [ENTRIES[k]]
        rng.shuffle(ws)
        cap = " ".join(ws)
        url = f"http://img{i % 31}.example.com/{rng.randint(0, 1800)}.jpg"
        r = rng.random()
        if r < 0.05:
            cap = rng.choice(ODD_CAPTIONS)
        elif r < 0.10:
            url = rng.choice(ODD_URLS)
        elif r < 0.14:
            cap = rng.choice(["ein kleiner Hund im Park", "un chien sur la plage", "the dog's bed , in red"])
        rows.append({"url": url, "caption": cap})
    return rows + [dict(r) for r in rows[10:60]]  # exact duplicates


def _reference_curate(rows, params: S.CurateParams, uri: str, lexicon):
    """The curation stage written row by row with the reference functions (one input file, one batch)."""
    cfg = params.caption_cfg
    live, rejected = [], []
    for i, r in enumerate(rows):
        url, cap = r["url"], r["caption"]
        uid = F.pair_uid(url, cap) if url is not None and cap is not None else None
        reason = F.check_caption(cap, cfg) or F.check_url(url)
        src = f"{uri}:{i + 1}"
        if reason:
            rejected.append((uid, url, cap, reason, src))
            continue
        ids = naive_match(cap, ENTRIES)
        if not ids:
            rejected.append((uid, url.strip(), cap, F.NO_MATCH, src))
            continue
        live.append({"uid": uid, "url": url.strip(), "caption": cap, "ids": ids, "src": src})
    if params.dedup != "none":
        first: dict = {}
        kept = []
        for row in live:
            key = row["url"] if params.dedup == "url" else (row["url"], row["caption"])
            if key in first:
                reason = F.DUPLICATE_URL_CAPTION if first[key]["caption"] == row["caption"] else F.DUPLICATE_URL
                rejected.append((row["uid"], row["url"], row["caption"], reason, row["src"]))
            else:
                first[key] = row
                kept.append(row)
        live = kept
    ident = LanguageIdentifier(make_backend("py3langid"), lexicon)
    kept = []
    for row, (lang, score, _m) in zip(live, ident.detect([row["caption"] for row in live])):
        if lang not in params.langs:
            rejected.append((row["uid"], row["url"], row["caption"], F.WRONG_LANGUAGE, row["src"]))
        else:
            kept.append({**row, "lang": lang, "score": score})
    counts = np.zeros(len(ENTRIES), np.int64)
    for row in kept:
        counts[row["ids"]] += 1
    cands = []
    for row in kept:
        p = B.keep_probability(row["ids"], counts, params.t)
        if B.is_kept(params.seed, row["uid"], p):
            cands.append((row["uid"], row["url"], row["caption"], row["ids"], row["lang"],
                          float(np.float32(row["score"])), p))
        else:
            rejected.append((row["uid"], row["url"], row["caption"], F.NOT_SAMPLED, row["src"]))
    return cands, rejected, counts


@pytest.mark.parametrize("dedup", ["none", "url", "url_caption"])
def test_stage_equals_per_row_model(tmp_path, lexicon, dedup):
    rows = _rows()
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("url", pa.string()), ("caption", pa.string())])),
                   path)
    QL.save(QL.from_sources([("user", ENTRIES)]), str(tmp_path / "ql.parquet"))
    params = S.CurateParams(t=60, dedup=dedup, batch_rows=100_000)
    stats = run_curate([str(path)], str(tmp_path / "ql.parquet"), str(tmp_path / "out"), params)
    cands, rejected, counts = _reference_curate(rows, params, str(path), lexicon)
    got = pq.read_table(tmp_path / "out" / "candidates" / "part-00000-000000000000.parquet").to_pydict()
    assert list(zip(got["uid"], got["url"], got["caption"], got["entry_ids"], got["lang"], got["lang_score"],
                    got["keep_prob"])) == cands
    rej = pq.read_table(tmp_path / "out" / "rejected" / "curate-part-00000-000000000000.parquet").to_pydict()
    got_rej = list(zip(rej["uid"], rej["url"], rej["caption"], rej["reason"], rej["source"]))
    assert sorted(got_rej, key=lambda r: int(r[4].rsplit(":", 1)[1])) == \
        sorted(rejected, key=lambda r: int(r[4].rsplit(":", 1)[1]))
    assert pq.read_table(tmp_path / "out" / "entry_counts.parquet").column("count").to_pylist() == counts.tolist()
    assert stats["kept"] == len(cands) and stats["input_rows"] == len(rows)
    reasons = Counter(r[3] for r in rejected)
    assert stats["rejected"] == dict(sorted(reasons.items()))
    assert reasons[F.NO_MATCH] and reasons[F.WRONG_LANGUAGE] and reasons[F.NOT_SAMPLED]
    assert (dedup == "none") == (not reasons[F.DUPLICATE_URL_CAPTION])
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["params"]["dedup"] == dedup
