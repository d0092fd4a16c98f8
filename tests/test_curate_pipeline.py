"""The curation stage end to end on Beam's DirectRunner: funnel accounting, balancing, determinism, reruns, S3."""
import io
import json
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.balance import metaclip as B
from pipelines.curate import querylist as QL
from pipelines.core import storage
from pipelines.core.storage import StorageError
from pipelines.curate.stage import read_candidates, run_curate
from pipelines.curate.steps import CurateParams

ENTRIES = ["dog", "cat", "hot dog", "red", "car", "tree", "house", "bird", "beach", "city"]
WORDS = ["the", "a", "small", "happy", "old", "picture", "of", "near", "with", "running", "standing", "photo"]


def make_rows(n=3000, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        # Zipf-like entry use: "dog" is a head entry
        k = min(int(rng.paretovariate(1.2)) - 1, len(ENTRIES) - 1)
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))] + [ENTRIES[k]]
        rng.shuffle(words)
        rows.append({"url": f"http://img{i % 97}.example.com/{i}.jpg", "caption": " ".join(words)})
    rows += [
        {"url": "http://x.com/dup.jpg", "caption": "a dog in the city"},
        {"url": "http://x.com/dup.jpg", "caption": "a dog in the city"},  # duplicate_url_caption
        {"url": "http://x.com/dup.jpg", "caption": "a cat in the city"},  # duplicate_url
        {"url": "ftp://x.com/a.jpg", "caption": "a dog on the beach"},  # bad_url_scheme
        {"url": None, "caption": "a dog on the beach"},  # missing_url
        {"url": "http://x.com/b.jpg", "caption": None},  # empty_caption
        {"url": "http://x.com/c.jpg", "caption": "nothing matches here"},  # no_match
        {"url": "http://x.com/d.jpg", "caption": "ein kleiner Hund und eine Katze dog"},  # wrong_language
        {"url": "http://x.com/e.jpg", "caption": "dog " * 600},  # too_long
    ]
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("curate_in")
    rows = make_rows()
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), d / "part1.parquet")
    with open(d / "part2.jsonl", "w") as f:
        for r in rows[half:]:
            f.write(json.dumps(r) + "\n")
    QL.save(QL.from_sources([("user", ENTRIES)]), str(d / "ql.parquet"))
    return d, rows


def _candidates(out):
    return read_candidates(str(out)).sort_by("uid")


def test_funnel_and_outputs(inputs, tmp_path):
    d, rows = inputs
    stats = run_curate([str(d / "part1.parquet"), str(d / "part2.jsonl")], str(d / "ql.parquet"), str(tmp_path),
                       CurateParams(t=100, batch_rows=700))
    assert stats["input_rows"] == len(rows)
    assert stats["input_rows"] == stats["kept"] + sum(stats["rejected"].values())
    for reason in ("duplicate_url_caption", "duplicate_url", "bad_url_scheme", "missing_url", "empty_caption",
                   "no_match", "wrong_language", "too_long", "not_sampled"):
        assert stats["rejected"].get(reason, 0) >= 1, reason
    cands = _candidates(tmp_path)
    rejected = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "rejected").glob("*.parquet"))])
    assert cands.num_rows == stats["kept"] and rejected.num_rows == sum(stats["rejected"].values())
    assert set(rejected.column("reason").to_pylist()) == set(stats["rejected"])
    assert len(set(cands.column("uid").to_pylist())) == cands.num_rows
    # entry ids are sorted, and keep_prob is 1 - prod(1 - p_e) from the written entry counts
    counts_tbl = pq.read_table(tmp_path / "entry_counts.parquet")
    assert counts_tbl.column_names == ["entry_id", "count"]
    counts = counts_tbl.column("count").to_numpy()
    for ids, p in zip(cands.column("entry_ids").to_pylist(), cands.column("keep_prob").to_pylist()):
        assert ids == sorted(set(ids))
        assert p == pytest.approx(B.keep_probability(ids, counts, 100))
    # the head entry was capped near t, the tail entries kept whole
    kept_dog = sum(1 for ids in cands.column("entry_ids").to_pylist() if ids == [0])
    assert counts[0] > 300 and kept_dog < 160
    assert stats["steps"][-1]["rows_out"] == stats["kept"]
    assert [s["step"] for s in stats["steps"]][:2] == ["read", "caption_filters"]
    assert stats["inputs"][0]["sha256"] == storage.sha256_of(str(d / "part1.parquet"))


def test_same_result_for_any_worker_count_and_batching(inputs, tmp_path):
    d, _ = inputs
    files = [str(d / "part1.parquet"), str(d / "part2.jsonl")]
    a = run_curate(files, str(d / "ql.parquet"), str(tmp_path / "a"), CurateParams(t=100, batch_rows=700))
    b = run_curate(files, str(d / "ql.parquet"), str(tmp_path / "b"), CurateParams(t=100, batch_rows=700),
                   workers=2)
    c = run_curate(files, str(d / "ql.parquet"), str(tmp_path / "c"), CurateParams(t=100, batch_rows=250))
    assert a["rejected"] == b["rejected"] == c["rejected"]
    ca, cb, cc = (_candidates(tmp_path / x) for x in "abc")
    assert ca.equals(cb) and ca.equals(cc)
    # same batching => byte-identical files
    for f in sorted((tmp_path / "a" / "candidates").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "candidates" / f.name).read_bytes()


def test_target_size(inputs, tmp_path):
    d, _ = inputs
    stats = run_curate([str(d / "part1.parquet")], str(d / "ql.parquet"), str(tmp_path),
                       CurateParams(target_size=600, balance=False))
    probs = _candidates(tmp_path).column("keep_prob").to_numpy()
    assert probs.sum() == pytest.approx(600, rel=0.01)
    assert stats["balance"]["t"] < stats["balance"]["matched_pairs_entry_total"]


def test_rerun_reuses_and_interrupted_output_is_redone(inputs, tmp_path):
    d, _ = inputs
    args = ([str(d / "part1.parquet")], str(d / "ql.parquet"), str(tmp_path))
    first = run_curate(*args, CurateParams(t=50))
    before = _candidates(tmp_path)
    assert run_curate(*args, CurateParams(t=50)).get("reused")
    # simulate a kill: no stats.json, a half-written stray part and a missing part
    (tmp_path / "stats.json").unlink()
    parts = sorted((tmp_path / "candidates").iterdir())
    parts[0].unlink()
    (tmp_path / "candidates" / "part-99999-000000000000.parquet").write_bytes(b"PAR1 half")
    with pytest.raises(StorageError):
        read_candidates(str(tmp_path))  # unfinished output is never taken for finished
    again = run_curate(*args, CurateParams(t=50))
    assert not again.get("reused") and again["rejected"] == first["rejected"]
    assert _candidates(tmp_path).equals(before)
    # deleting any output file the marker lists makes the next run redo the stage
    for victim in (sorted((tmp_path / "candidates").iterdir())[-1], tmp_path / "entry_counts.parquet",
                   sorted((tmp_path / "rejected").iterdir())[0]):
        victim.unlink()
        redone = run_curate(*args, CurateParams(t=50))
        assert not redone.get("reused") and _candidates(tmp_path).equals(before)
        assert run_curate(*args, CurateParams(t=50)).get("reused")
    # a different parameter is a different output
    assert not run_curate(*args, CurateParams(t=51)).get("reused")


def test_s3_input_and_output(inputs, s3_bucket):
    d, _ = inputs
    src = f"{s3_bucket}/raw/part2.jsonl"
    storage.write_bytes_atomic(src, (d / "part2.jsonl").read_bytes())
    storage.write_bytes_atomic(f"{s3_bucket}/ql.parquet", (d / "ql.parquet").read_bytes())
    out = f"{s3_bucket}/curated"
    stats = run_curate([f"{s3_bucket}/raw/*.jsonl"], f"{s3_bucket}/ql.parquet", out, CurateParams(t=100))
    assert stats["input_rows"] == stats["kept"] + sum(stats["rejected"].values())
    assert storage.exists(f"{out}/stats.json") and storage.exists(f"{out}/entry_counts.parquet")
    cands = read_candidates(out)
    assert cands.num_rows == stats["kept"] > 0


def _clipline(*args):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True)


def test_cli_user_errors_are_one_line(inputs, tmp_path):
    d, _ = inputs
    bad = tmp_path / "bad.csv"
    bad.write_text("link,text\nhttp://a.com/1.jpg,a dog\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"dog\ncaf\xe9\n")
    for args, needle in [
        (["curate", "-i", str(bad), "-q", str(d / "ql.parquet"), "-o", str(tmp_path / "o")], "no column 'url'"),
        (["curate", "-i", str(tmp_path / "none.tsv"), "-q", str(d / "ql.parquet"), "-o", str(tmp_path / "o")],
         "no such file"),
        (["curate", "-i", str(d / "part2.jsonl"), "-q", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o")],
         "no such query list"),
        (["querylist", "stats", str(latin)], "line 2: not valid UTF-8"),
    ]:
        res = _clipline(*args)
        assert res.returncode == 2, res.stderr
        assert needle in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "stats.json").exists()


def test_cli_curate_and_querylist(inputs, tmp_path):
    d, _ = inputs
    terms = tmp_path / "terms.txt"
    terms.write_text("\n".join(ENTRIES))
    res = _clipline("querylist", "build", "--out", str(tmp_path / "ql.parquet"), "--terms", str(terms),
                    "--wordfreq", "100")
    assert res.returncode == 0, res.stderr
    res = _clipline("querylist", "stats", str(tmp_path / "ql.parquet"), "--json")
    assert json.loads(res.stdout)["by_source"]["user:terms.txt"] == len(ENTRIES)
    res = _clipline("curate", "-i", str(d / "part1.parquet"), "-q", str(tmp_path / "ql.parquet"),
                    "-o", str(tmp_path / "out"), "--t", "100")
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert "funnel" in res.stdout and f"{stats['kept']:,}" in res.stdout
