"""Per-input-file curation cache (dataset versions): a new file is the only one read, matched and language-identified,
and the output equals curating every file now (cross-file dedup, counts and balancing stay global)."""
import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.curate import file_cache
from pipelines.curate import querylist as QL
from pipelines.curate.stage import CurateStage
from pipelines.curate.steps import CurateParams
from tests.test_curate_pipeline import ENTRIES, make_rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fc_in")
    rows = make_rows(1500, seed=3)
    # Cross-file duplicates: file 0 holds a German caption for a URL that a later file captions in English (the
    # earliest row wins dedup and is then dropped for its language, so the URL is gone, as in one pass), and a URL
    # that a later file repeats with the same caption.
    first = rows[:600] + [{"url": "http://x.com/shared.jpg", "caption": "ein kleiner Hund und eine Katze dog"},
                          {"url": "http://x.com/again.jpg", "caption": "a happy dog near the beach"}]
    second = rows[600:1100]
    third = rows[1100:] + [{"url": "http://x.com/shared.jpg", "caption": "a small dog near the house"},
                           {"url": "http://x.com/again.jpg", "caption": "a happy dog near the beach"}]
    paths = []
    for i, part in enumerate((first, second, third)):
        paths.append(str(d / f"part{i}.parquet"))
        pq.write_table(pa.Table.from_pylist(part), paths[-1])
    QL.save(QL.from_sources([("user", ENTRIES)]), str(d / "ql.parquet"))
    return d, paths


def _run(out, paths, ql, cache=None):
    stage = CurateStage(CurateParams(t=40, seed=1, batch_rows=256), {"raw": paths, "querylist": ql}, str(out))
    stage.file_cache = cache
    return stage.run()


def _tables(out) -> dict:
    return {os.path.relpath(f, out): pq.read_table(f).to_pylist()
            for f in sorted(glob.glob(f"{out}/**/*.parquet", recursive=True)) if "/_tmp/" not in f}


def test_new_file_is_the_only_one_read_and_output_equals_one_pass(files, tmp_path, monkeypatch):
    d, paths = files
    ql = str(d / "ql.parquet")
    reads = []
    real = file_cache.read_batches
    monkeypatch.setattr(file_cache, "read_batches", lambda inp, n: (reads.append(inp.uri), real(inp, n))[1])
    cache = str(tmp_path / "cache")

    _run(tmp_path / "v1", paths[:2], ql, cache)
    assert sorted(set(reads)) == paths[:2]
    reads.clear()
    v2 = _run(tmp_path / "v2", paths, ql, cache)
    assert set(reads) == {paths[2]}  # the two earlier files came from the cache
    reads.clear()
    plain = _run(tmp_path / "plain", paths, ql)  # no cache: the stage as a plain build runs it
    assert not reads

    assert _tables(tmp_path / "v2") == _tables(tmp_path / "plain")
    assert (v2.kept, v2.rejected, v2.details["steps"]) == (plain.kept, plain.rejected, plain.details["steps"])
    cands = [r for t, rows in _tables(tmp_path / "v2").items() if t.startswith("candidates") for r in rows]
    assert not any(r["url"] == "http://x.com/shared.jpg" for r in cands)  # earliest row won, then lost on language
    assert v2.rejected.get("duplicate_url", 0) + v2.rejected.get("duplicate_url_caption", 0) >= 2


def test_renamed_file_is_a_cache_hit_and_its_rejected_rows_name_the_new_file(files, tmp_path, monkeypatch):
    d, paths = files
    ql = str(d / "ql.parquet")
    cache = str(tmp_path / "cache")
    _run(tmp_path / "a", paths[:1], ql, cache)
    moved = str(tmp_path / "renamed.parquet")
    with open(paths[0], "rb") as src, open(moved, "wb") as dst:
        dst.write(src.read())
    reads = []
    real = file_cache.read_batches
    monkeypatch.setattr(file_cache, "read_batches", lambda inp, n: (reads.append(inp.uri), real(inp, n))[1])
    _run(tmp_path / "b", [moved], ql, cache)
    assert not reads
    monkeypatch.undo()
    _run(tmp_path / "c", [moved], ql)
    assert _tables(tmp_path / "b") == _tables(tmp_path / "c")
    sources = [r["source"] for t, rows in _tables(tmp_path / "b").items() if "rejected" in t for r in rows]
    assert sources and all(s.startswith(moved + ":") for s in sources if s)


def test_killed_file_entry_is_redone(files, tmp_path):
    d, paths = files
    ql = str(d / "ql.parquet")
    cache = str(tmp_path / "cache")
    _run(tmp_path / "a", paths[:1], ql, cache)
    done = glob.glob(f"{cache}/*/*/{file_cache.DONE}")
    assert len(done) == 1
    os.remove(done[0])  # as if the run died before the file's entry was complete
    for f in glob.glob(os.path.join(os.path.dirname(done[0]), "*.live.parquet"))[:1]:
        with open(f, "wb") as fh:
            fh.write(b"half a file")
    _run(tmp_path / "b", paths[:1], ql, cache)
    _run(tmp_path / "c", paths[:1], ql)
    assert _tables(tmp_path / "b") == _tables(tmp_path / "c")
    assert os.path.exists(done[0])
