"""Readers, filters and query lists: every format, every reject reason, and clear errors for bad input."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.curate import filters as F
from pipelines.curate import querylist as QL
from pipelines.curate.readers import InputError, read_batches, resolve_inputs

ROWS = [("http://a.com/1.jpg", "a dog on a beach"), ("https://b.org/2.png", "two cats, sleeping")]


def _rows(inp):
    out = []
    for b in read_batches(inp, batch_rows=1):
        out.extend(zip(b.urls, b.captions, b.rows, [b.bad.get(i) for i in range(len(b.urls))]))
    return out


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "csv.gz", "jsonl.gz"])
def test_formats_read_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"in.{fmt}"
    base = fmt.replace(".gz", "")
    if base == "parquet":
        pq.write_table(pa.table({"caption": [c for _, c in ROWS], "url": [u for u, _ in ROWS]}), path)
    else:
        if base == "jsonl":
            text = "".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in ROWS)
        else:
            d = "," if base == "csv" else "\t"
            q = (lambda s: f'"{s}"') if base == "csv" else (lambda s: s)
            text = f"url{d}caption\n" + "".join(f"{u}{d}{q(c)}\n" for u, c in ROWS)
        data = text.encode()
        path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    (inp,) = resolve_inputs([str(path)])
    assert [(u, c) for u, c, _r, _b in _rows(inp)] == ROWS


def test_headerless_tsv_with_columns(tmp_path):
    path = tmp_path / "cc.tsv"
    path.write_text('caption with "quote\thttp://x.com/a.jpg\n\nsecond one\thttp://x.com/b.jpg\n')
    (inp,) = resolve_inputs([str(path)], columns=["caption", "url"])
    rows = _rows(inp)
    assert [r[1] for r in rows] == ['caption with "quote', "second one"]
    assert [r[2] for r in rows] == [1, 3]  # line numbers in the file (a blank line is not a record)


def test_missing_column_names_file_and_columns(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("link,text\nhttp://a.com/x.jpg,hello world\n")
    with pytest.raises(InputError) as err:
        resolve_inputs([str(path)])
    msg = str(err.value)
    assert str(path) in msg and "'url'" in msg and "link" in msg


def test_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        resolve_inputs([str(empty)])
    notpq = tmp_path / "bad.parquet"
    notpq.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet"):
        resolve_inputs([str(notpq)])
    with pytest.raises(InputError, match="no such file"):
        resolve_inputs([str(tmp_path / "missing.csv")])
    with pytest.raises(InputError, match="no input files match"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    odd = tmp_path / "data.xyz"  # no known extension: the content decides (here: binary, not a table)
    odd.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match="data.xyz: not a readable table: binary content"):
        resolve_inputs([str(odd)])
    text = tmp_path / "pairs.data"  # unknown extension, JSON lines content: read as JSON lines
    text.write_text('{"url": "http://a.com/1.jpg", "caption": "a fine caption"}\n')
    assert resolve_inputs([str(text)])[0].fmt == "jsonl"
    pq.write_table(pa.table({"url": ["http://a.com/1.jpg"], "caption": ["a caption"]}), tmp_path / "t.bin")
    assert resolve_inputs([str(tmp_path / "t.bin")])[0].fmt == "parquet"  # Parquet by its magic bytes


def test_bad_records_are_flagged_not_fatal(tmp_path):
    path = tmp_path / "in.tsv"
    path.write_bytes(b"url\tcaption\nhttp://a.com/1.jpg\tgood caption here\n"
                     b"http://a.com/2.jpg\tbad \xff\xfe bytes\nonly-one-field\n")
    (inp,) = resolve_inputs([str(path)])
    rows = _rows(inp)
    assert [r[3] for r in rows] == [None, "invalid_utf8", "malformed_record"]
    assert "\ufffd" in rows[1][1]  # repaired for the rejected table, still readable
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"url": "http://a.com/1.jpg", "caption": "fine text"}\n{not json\n[1, 2]\n')
    (inp,) = resolve_inputs([str(jl)])
    assert [r[3] for r in _rows(inp)] == [None, "malformed_record", "malformed_record"]


@pytest.mark.parametrize("caption,reason", [
    (None, F.EMPTY_CAPTION), ("   ", F.EMPTY_CAPTION), ("abc", F.TOO_FEW_CHARS), ("singleword", F.TOO_FEW_WORDS),
    ("x" * 1001, F.TOO_LONG), ("12345 678", F.INVALID_TEXT), ("bad \x00 control", F.INVALID_TEXT),
    ("replacement \ufffd char", F.INVALID_TEXT), (" ".join(["w"] * 201), F.TOO_LONG), ("a fine caption", None),
])
def test_caption_reasons(caption, reason):
    assert F.check_caption(caption, F.CaptionFilterConfig()) == reason


@pytest.mark.parametrize("url,reason", [
    (None, F.MISSING_URL), ("", F.MISSING_URL), ("ftp://a.com/x.jpg", F.BAD_URL_SCHEME),
    ("javascript:alert(1)", F.BAD_URL_SCHEME), ("http://", F.BAD_URL_HOST), ("http://exa mple.com/x", F.BAD_URL_HOST),
    ("http://a..b/x", F.BAD_URL_HOST), ("http://a.com:99999/x", F.BAD_URL_HOST), ("https://a.com/x.jpg", None),
    ("HTTP://A.COM/x", None), ("http://[::1]/x.jpg", None), ("http://10.0.0.1:8080/a", None),
])
def test_url_reasons(url, reason):
    assert F.check_url(url) == reason


def test_uid_is_deterministic_and_distinguishes_fields():
    assert F.pair_uid("u", "c") == F.pair_uid("u", "c")
    assert F.pair_uid("u", "c") != F.pair_uid("u", "c ")
    assert F.pair_uid("ab", "c") != F.pair_uid("a", "bc")
    assert len(F.pair_uid("u", "c")) == 32


def test_querylist_sources_and_roundtrip(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("hot dog\n\ncat\ncat\n")
    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "index.noun").write_text("  1 This software and database is being provided\n"
                                   "hot_dog n 2 3 @ ~ + 2 1 07697537 10187710\ndog n 7 5 @ ~ #m 7 1 02084071\n")
    (wn / "index.verb").write_text("run v 41 3 @ ~ * 41 32 01926311\n")
    bigrams = QL.pmi_bigrams(["new york city", "new york skyline", "a new car", "york minster", "a dog"] * 3,
                             min_count=3, min_pmi=0.0)
    assert "new york" in bigrams
    ql = QL.from_sources([("user", QL.read_term_file(str(terms))), ("wordnet", QL.wordnet_lemmas(str(wn))),
                          ("wordfreq", QL.wordfreq_unigrams(50)), ("bigram_pmi", bigrams)])
    assert ql.entries[:4] == ("hot dog", "cat", "dog", "run")
    assert ql.sources[:4] == ("user", "user", "wordnet", "wordnet")
    assert len(set(ql.entries)) == len(ql.entries)
    QL.save(ql, str(tmp_path / "ql.parquet"))
    back = QL.load(str(tmp_path / "ql.parquet"))
    assert back == ql and back.content_hash == ql.content_hash
    table = pq.read_table(tmp_path / "ql.parquet")
    assert table.column_names == ["entry_id", "entry", "source"] and table.schema.field("entry_id").type == pa.int32()
    assert QL.stats(ql)["by_source"]["user"] == 2
    text = QL.load(str(terms))
    assert text.entries == ("hot dog", "cat", "cat")  # a text list: ids are line order, blank lines skipped


def test_querylist_errors(tmp_path):
    with pytest.raises(QL.QueryListError, match="no such"):
        QL.load(str(tmp_path / "nope.parquet"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"entry_id": pa.array([0, 2], pa.int32()), "entry": ["a", "b"]}), bad)
    with pytest.raises(QL.QueryListError, match="dense"):
        QL.load(str(bad))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(QL.QueryListError, match="line 2"):
        QL.load(str(latin))
    with pytest.raises(QL.QueryListError, match="WordNet"):
        QL.wordnet_lemmas(str(tmp_path))
