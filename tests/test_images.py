"""Images stage: pure checks and near-dup search, Beam transforms, and process_images/rebalance on a real crawl.

The crawl is produced by img2dataset itself (webdataset output) from images served by http.server on 127.0.0.1.
"""
from __future__ import annotations

import functools
import io
import itertools
import random
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import apache_beam as beam
import numpy as np
import imagehash
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageDraw

from pipelines.balance import metaclip as balance
from pipelines.core import storage
from pipelines.core.beam import make_options
from pipelines.images import checks, near_dedup
from pipelines.balance.stage import kept_uids, rebalance
from pipelines.images.stage import ImagesConfig, process_images, read_rows
from pipelines.images.transforms import OK, REJECTED, CheckImages, NearDedup

RADIUS = 4


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def draw_image(i: int, size: tuple[int, int]) -> Image.Image:
    """A distinct procedurally drawn picture per ``i`` (shapes, colours and positions from a seeded RNG)."""
    rng = random.Random(i)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    w, h = size
    for _ in range(4):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randrange(10, w), y0 + rng.randrange(10, h))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    return img


def make_web(root) -> list[dict]:
    """Files under ``root`` and the rows (name, caption, entry_ids, expected outcome) that point at them."""
    rows = []
    for i in range(14):
        size = (64 + 11 * i, 64 + 7 * (i % 5))
        (root / f"img{i}.jpg").write_bytes(_jpeg(draw_image(i, size)))
        rows.append({"name": f"img{i}.jpg", "caption": f"picture {i}", "entry_ids": [i % 3, 3 + i % 2],
                     "expect": "ok"})
    # exact duplicate: the same bytes behind a second URL with another caption (so another uid)
    (root / "copy_of_img0.jpg").write_bytes((root / "img0.jpg").read_bytes())
    rows.append({"name": "copy_of_img0.jpg", "caption": "a copy", "entry_ids": [0], "expect": "exact"})
    # near duplicate: img1 re-encoded at a lower quality (different bytes, near-identical pHash)
    near = _jpeg(Image.open(root / "img1.jpg").convert("RGB"), quality=60)
    (root / "near_img1.jpg").write_bytes(near)
    rows.append({"name": "near_img1.jpg", "caption": "near copy", "entry_ids": [1], "expect": "near"})
    (root / "tiny.jpg").write_bytes(_jpeg(draw_image(100, (20, 20))))
    rows.append({"name": "tiny.jpg", "caption": "tiny", "entry_ids": [2], "expect": checks.TOO_SMALL})
    (root / "wide.jpg").write_bytes(_jpeg(draw_image(101, (300, 60))))
    rows.append({"name": "wide.jpg", "caption": "wide", "entry_ids": [2], "expect": checks.BAD_ASPECT})
    rows.append({"name": "missing.jpg", "caption": "gone", "entry_ids": [1], "expect": "crawl"})
    return rows


def _uid(i: int) -> str:
    # uids sort in row order, so "the smallest uid is kept" is the original in each duplicate pair
    return f"{i:032x}"


@pytest.fixture(scope="session")
def crawl_build(tmp_path_factory):
    """img2dataset's webdataset output for the test web; yields (crawl_dir, rows with uid/url)."""
    from img2dataset import download

    base = tmp_path_factory.mktemp("crawl")
    www = base / "www"
    www.mkdir()
    rows = make_web(www)
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for i, r in enumerate(rows):
            r["uid"], r["url"] = _uid(i), f"http://127.0.0.1:{port}/{r['name']}"
        pq.write_table(pa.table({
            "url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
            "uid": [r["uid"] for r in rows],
            "entry_ids": pa.array([r["entry_ids"] for r in rows], pa.list_(pa.int32()))}), base / "candidates.parquet")
        download(url_list=str(base / "candidates.parquet"), input_format="parquet", url_col="url",
                 caption_col="caption", output_format="webdataset", output_folder=str(base / "crawl"),
                 processes_count=1, thread_count=4, resize_mode="no", enable_wandb=False,
                 save_additional_columns=["uid", "entry_ids"], number_sample_per_shard=10, timeout=5, retries=0)
    finally:
        server.shutdown()
        server.server_close()
    return str(base / "crawl"), rows


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def pool_build(crawl_build, tmp_path_factory):
    """process_images over the crawl; yields (build_dir, stats, rows)."""
    crawl_dir, rows = crawl_build
    build = tmp_path_factory.mktemp("build")
    stats = process_images(crawl_dir, str(build / "pool"), ImagesConfig(min_side=32, max_aspect=3.0,
                                                                          near_dup_radius=RADIUS, pool_files=2))
    return str(build), stats, rows


# ---------------------------------------------------------------------------------------------- pure functions


def test_inspect_image_reasons():
    good = _jpeg(draw_image(1, (120, 90)))
    info = checks.inspect_image(good)
    assert (info.width, info.height, info.error) == (120, 90, None)
    assert checks.inspect_image(b"").error == checks.DECODE_ERROR
    assert checks.inspect_image(b"not an image at all").error == checks.DECODE_ERROR
    assert checks.inspect_image(good[: len(good) // 2]).error == checks.DECODE_ERROR  # truncated body
    assert checks.inspect_image(good, max_pixels=100).error == checks.TOO_LARGE  # judged from the header
    assert checks.check_size(31, 200, 32) == checks.TOO_SMALL
    assert checks.check_size(32, 200, 32) is None
    assert checks.check_aspect(300, 100, 3.0) is None
    assert checks.check_aspect(301, 100, 3.0) == checks.BAD_ASPECT
    assert checks.check_aspect(100, 301, 3.0) == checks.BAD_ASPECT


def test_hashes_agree_with_imagehash():
    from pipelines.decontam.hashing import dhash64_batch, phash64_batch

    datas = [_jpeg(draw_image(i, (64 + 13 * i, 96))) for i in range(12)]
    ref_p = [int(str(imagehash.phash(Image.open(io.BytesIO(d)))), 16) for d in datas]
    ref_d = [int(str(imagehash.dhash(Image.open(io.BytesIO(d)))), 16) for d in datas]
    full = [checks.inspect_image(d).image for d in datas]
    assert [int(h) for h in phash64_batch(full)] == ref_p  # the default decode is bit-exact
    assert [int(h) for h in dhash64_batch(full)] == ref_d
    reduced = phash64_batch([checks.inspect_image(d, reduced=True).image for d in datas])
    assert all(near_dedup.hamming64(a, b) <= 12 for a, b in zip(reduced, ref_p))  # close, not exact


def test_block_bounds_cover_64_bits():
    for r in (0, 1, 4, 7, 63):
        bounds = near_dedup.block_bounds(r)
        assert len(bounds) == r + 1
        assert sum(w for _, w in bounds) == 64
        assert bounds[-1][0] == 0
    with pytest.raises(ValueError):
        near_dedup.block_bounds(64)


def _brute_components(items, radius):
    edges = [(a, b) for (a, ha), (b, hb) in itertools.combinations(sorted(items), 2)
             if near_dedup.hamming64(ha, hb) <= radius]
    return near_dedup.component_roots(edges)


def _buckets(items, radius):
    """The stage's multi-index buckets: (block index, block value) -> members."""
    buckets: dict = {}
    for uid, h in items:
        for b in near_dedup.blocks(h, radius):
            buckets.setdefault(b, []).append((uid, h))
    return buckets


def test_multi_index_search_equals_brute_force():
    rng = random.Random(3)
    items = []
    for i in range(300):
        h = rng.getrandbits(64)
        items.append((f"u{i:04d}", h))
        if i % 10 == 0:  # plant chains of near duplicates
            for j in range(rng.randrange(1, 4)):
                h ^= 1 << rng.randrange(64)
                if rng.random() < 0.5:
                    h ^= 1 << rng.randrange(64)
                items.append((f"v{i:04d}{j}", h))
    for radius in (0, 2, 4):
        buckets = _buckets(items, radius)
        edges = [e for (bi, _), members in buckets.items() for e in near_dedup.bucket_pairs(bi, members, radius)]
        assert len(edges) == len(set(edges))  # each pair reported once
        assert near_dedup.component_roots(edges) == _brute_components(items, radius)


def test_multi_index_search_with_shared_and_crowded_hashes_equals_brute_force():
    """A placeholder hash many uids share and a crowded bucket (200 hashes agreeing on the first block, beyond the
    numpy threshold) give the brute-force components, each edge once."""
    rng = random.Random(5)
    items = [(f"p{i:03d}", 0x0123456789ABCDEF) for i in range(120)]  # one hash shared by 120 uids
    base = 0
    for i in range(200):  # top 22 bits zero: one crowded bucket for radius 2 and 4, with chains inside it
        h = rng.getrandbits(42) if i % 4 == 0 else base ^ (1 << rng.randrange(42)) ^ (1 << rng.randrange(42))
        base = h
        items.append((f"c{i:03d}", h))
    items += [(f"q{i:02d}", 0x0123456789ABCDEF ^ (1 << i)) for i in range(0, 64, 9)]  # near the placeholder
    items += [(f"d{i:02d}", items[200][1]) for i in range(5)]  # duplicates of a crowded-bucket hash
    for radius in (0, 2, 4):
        buckets = _buckets(items, radius)
        if radius:
            assert max(len({h for _u, h in m}) for m in buckets.values()) > near_dedup._NUMPY_FROM
        edges = [e for (bi, _), members in buckets.items() for e in near_dedup.bucket_pairs(bi, members, radius)]
        assert len(edges) == len(set(edges)) and all(a < b for a, b in edges)
        assert near_dedup.component_roots(edges) == _brute_components(items, radius)


def test_component_roots_keep_smallest_uid():
    assert near_dedup.component_roots([("b", "c"), ("a", "c"), ("x", "y")]) == {"b": "a", "c": "a", "y": "x"}


def test_components_combiner_merges_partial_forests_like_one_union_find():
    """NearComponents folds edges per bundle and merges the forests: any split of the edges into bundles, with or
    without compaction, in any merge order, gives the components of all the edges at once."""
    from pipelines.images.transforms import NearComponents

    rng = random.Random(5)
    for trial in range(30):
        n = rng.randrange(2, 300)
        uids = [f"u{rng.randrange(10 ** 6):06d}" for _ in range(n)]
        edges = [(rng.choice(uids), rng.choice(uids)) for _ in range(rng.randrange(1, 2 * n))]
        edges = [(a, b) for a, b in edges if a != b] or [(uids[0], uids[-1] + "x")]
        fn = NearComponents()
        bundles = [fn.create_accumulator() for _ in range(rng.randrange(1, 8))]
        for e in edges:
            k = rng.randrange(len(bundles))
            bundles[k] = fn.add_input(bundles[k], e)
        bundles = [fn.compact(b) if rng.random() < 0.5 else b for b in bundles]
        rng.shuffle(bundles)
        while len(bundles) > 1:  # merged in a tree of random shape, as a runner may
            k = rng.randrange(1, len(bundles) + 1)
            bundles = [fn.merge_accumulators(bundles[:k])] + bundles[k:]
        assert fn.extract_output(bundles[0]) == near_dedup.component_roots(edges), trial


# ------------------------------------------------------------------------------------------------ Beam transforms


def test_check_images_transform_tags_reasons():
    good = _jpeg(draw_image(5, (100, 80)))
    recs = [
        {"uid": "a", "status": "success", "image": good, "original_width": 100, "original_height": 80},
        {"uid": "b", "status": "success", "image": b"\xff\xd8garbage"},
        {"uid": "c", "status": "success", "image": None},
        {"uid": "d", "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found", "image": None},
        {"uid": "e", "status": "success", "image": _jpeg(draw_image(6, (200, 40)))},
    ]
    with TestPipeline(options=make_options()) as p:
        out = p | beam.Create(recs) | CheckImages(min_side=32, max_aspect=3.0)
        assert_that(out[OK] | "okuids" >> beam.Map(lambda r: (r["uid"], r["sha256"], r["phash"] is not None)),
                    equal_to([("a", checks.sha256_hex(good), True)]), label="ok")
        assert_that(out[REJECTED] | beam.Map(lambda r: (r["uid"], r["status"], r["stage"], r["reason"])),
                    equal_to([("b", "rejected", "images", checks.DECODE_ERROR),
                              ("c", "rejected", "images", checks.MISSING_IMAGE),
                              ("d", "failed", "crawl", "http_404"),
                              ("e", "rejected", "images", checks.BAD_ASPECT)]), label="rejected")


def test_near_dedup_transform_matches_pure_search():
    rng = random.Random(11)
    rows = []
    for i in range(60):
        h = rng.getrandbits(64)
        rows.append({"uid": f"u{i:03d}", "phash": h})
        if i % 7 == 0:
            rows.append({"uid": f"w{i:03d}", "phash": h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64))})
    expected_removed = _brute_components([(r["uid"], r["phash"]) for r in rows], RADIUS)
    with TestPipeline(options=make_options()) as p:
        out = p | beam.Create(rows) | NearDedup(RADIUS)
        assert_that(out[REJECTED] | beam.Map(lambda r: (r["uid"], r["duplicate_of"])),
                    equal_to(sorted(expected_removed.items())), label="removed")
        assert_that(out[OK] | "ok" >> beam.Map(lambda r: r["uid"]),
                    equal_to([r["uid"] for r in rows if r["uid"] not in expected_removed]), label="kept")


# -------------------------------------------------------------------------------------------- stage on real crawl


@pytest.mark.slow
def test_process_images_funnel_and_reasons(pool_build):
    build, stats, rows = pool_build
    pool = read_rows(stats.outputs["pool"])
    by_uid = {r["uid"]: r for r in pool}
    assert sorted(by_uid) == sorted(r["uid"] for r in rows)  # every crawled row is in the pool exactly once
    assert len(pool) == len(rows)
    fetched = [r for r in rows if r["expect"] != "crawl"]  # the crawl stage reports its own failures
    assert stats.input_rows == stats.kept + sum(stats.rejected.values()) == len(fetched)
    assert stats.details["crawled_rows"] == len(rows)
    for r in rows:
        got = by_uid[r["uid"]]
        if r["expect"] == "ok":
            assert got["status"] == "ok", got
            assert got["phash"] is not None and got["sha256"] and got["jpg_size"] > 0
        elif r["expect"] == "exact":
            assert (got["stage"], got["reason"], got["duplicate_of"]) == ("dedup", checks.EXACT_DUP, _uid(0))
        elif r["expect"] == "near":
            assert (got["stage"], got["reason"], got["duplicate_of"]) == ("dedup", checks.NEAR_DUP, _uid(1))
        elif r["expect"] == "crawl":
            assert (got["status"], got["stage"]) == ("failed", "crawl") and "404" in got["reason"]
        else:
            assert (got["stage"], got["reason"]) == ("images", r["expect"])
    rejected = read_rows([stats.outputs["rejected"]])
    assert sorted(r["uid"] for r in rejected) == sorted(u for u, r in by_uid.items()
                                                        if r["status"] != "ok" and r["stage"] != "crawl")
    # the stored hashes are imagehash's pHash / dHash of the crawled bytes
    for r in rows:
        if r["expect"] == "ok":
            img = Image.open(io.BytesIO(_crawl_image(by_uid[r["uid"]])))
            assert by_uid[r["uid"]]["phash"] == int(str(imagehash.phash(img)), 16)
            assert by_uid[r["uid"]]["dhash"] == int(str(imagehash.dhash(img)), 16)


def _crawl_image(row: dict) -> bytes:
    with storage.open_read(row["crawl_tar"]) as f:
        f.seek(row["jpg_offset"])
        return f.read(row["jpg_size"])


@pytest.mark.slow
def test_process_images_rerun_is_skipped_and_identical(pool_build, crawl_build, tmp_path):
    build, stats, _rows = pool_build
    before = {f: storage.read_bytes(f) for f in stats.outputs["pool"]}
    cfg = ImagesConfig(min_side=32, max_aspect=3.0, near_dup_radius=RADIUS, pool_files=2)
    again = process_images(crawl_build[0], storage.join(build, "pool"), cfg)
    assert again.reused and again.to_dict() == stats.to_dict()
    assert {f: storage.read_bytes(f) for f in stats.outputs["pool"]} == before
    # deleting an output file makes the next run redo the stage, to the same bytes
    for victim in (stats.outputs["pool"][-1], stats.outputs["rejected"]):
        storage.delete(victim)
        redone = process_images(crawl_build[0], storage.join(build, "pool"), cfg)
        assert not redone.reused and {f: storage.read_bytes(f) for f in stats.outputs["pool"]} == before
    # a fresh directory recomputes to the same bytes (deterministic output)
    fresh = process_images(crawl_build[0], str(tmp_path / "pool"),
                           ImagesConfig(min_side=32, max_aspect=3.0, near_dup_radius=RADIUS, pool_files=2))
    assert [storage.read_bytes(f) for f in fresh.outputs["pool"]] == list(before.values())


@pytest.mark.slow
def test_rebalance_recounts_and_draws_per_uid(pool_build, tmp_path):
    build, stats, _rows = pool_build
    pool = [r for r in read_rows(stats.outputs["pool"]) if r["status"] == "ok"]
    # exclude one uid as decontamination would
    excluded = pool[0]["uid"]
    ex_uri = str(tmp_path / "matches.parquet")
    pq.write_table(pa.table({"uid": [excluded]}), ex_uri)
    out_dir = str(tmp_path / "balance")
    t = 3.0
    res = rebalance(storage.join(build, "pool"), out_dir, t=t, seed=7, exclude=[ex_uri])
    survivors = [r for r in pool if r["uid"] != excluded]
    counts = {}
    for r in survivors:
        for e in r["entry_ids"]:
            counts[e] = counts.get(e, 0) + 1
    assert res.details["counts_before"] == {str(k): v for k, v in sorted(counts.items())}
    expect_kept = sorted(r["uid"] for r in survivors
                         if balance.is_kept(7, r["uid"], balance.keep_probability(r["entry_ids"], counts, t)))
    assert kept_uids(out_dir) == expect_kept
    assert 0 < res.kept < len(survivors)  # t = 3 really drops some pairs
    assert res.input_rows == len(survivors)
    dropped = read_rows([res.outputs["rejected"]])
    assert {r["reason"] for r in dropped} == {"not_sampled"}
    assert len(dropped) + res.kept == len(survivors)
    after = {}
    for r in survivors:
        if r["uid"] in set(expect_kept):
            for e in r["entry_ids"]:
                after[e] = after.get(e, 0) + 1
    assert res.details["counts_after"] == {str(k): v for k, v in sorted(after.items())}
    # rerun: the recorded result, unchanged files
    again = rebalance(storage.join(build, "pool"), out_dir, t=t, seed=7, exclude=[ex_uri])
    assert again.reused and again.to_dict() == res.to_dict()
    storage.delete(res.outputs["kept"])  # a missing output file: the stage is redone
    redone = rebalance(storage.join(build, "pool"), out_dir, t=t, seed=7, exclude=[ex_uri])
    assert not redone.reused and kept_uids(out_dir) == expect_kept
    # target size: solve_t on the recounted pool
    res2 = rebalance(storage.join(build, "pool"), str(tmp_path / "b2"), target_size=5, seed=7)
    lists = [r["entry_ids"] for r in pool]
    dense = np.bincount([e for ids in lists for e in ids])
    assert res2.details["t"] == pytest.approx(balance.solve_t(lists, dense, 5))


def test_bad_crawl_dir_is_a_clear_error(tmp_path):
    from pipelines.images.crawl_reader import CrawlFormatError

    with pytest.raises(CrawlFormatError, match="no img2dataset shard"):
        process_images(str(tmp_path), str(tmp_path / "pool"))
    pq.write_table(pa.table({"key": ["0"], "status": ["success"], "url": ["http://x"]}), tmp_path / "00000.parquet")
    with pytest.raises(CrawlFormatError, match="no 'uid' column"):
        process_images(str(tmp_path), str(tmp_path / "pool"))
    with pytest.raises(ValueError, match="unknown key"):
        ImagesConfig.from_dict({"min_sides": 3})


def test_a_recrawled_uid_counts_once_where_its_final_outcome_is(tmp_path):
    """Round 0 failed a and c; the re-crawl round got a and failed c again: the reader gives b from round 0 and
    a, c from the re-crawl, once each, and only the uids found twice travel in the outcome map."""
    from pipelines.images.crawl_reader import final_outcomes, read_crawl_shard

    def shard(name, rows):
        uri = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"key": [r[0] for r in rows], "uid": [r[0] for r in rows],
                                 "status": [r[1] for r in rows], "url": [f"http://x/{r[0]}" for r in rows]}), uri)
        return uri, str(tmp_path / f"{name}.tar")

    round0 = shard("00000", [("a", "failed_to_download"), ("b", "success"), ("c", "failed_to_download")])
    round1 = shard("recrawl", [("a", "success"), ("c", "failed_to_download")])
    outcomes = final_outcomes([round0, round1])
    assert outcomes == {"a": round1[0], "c": round1[0]}
    got = [(r["uid"], r["status"]) for pair in (round0, round1) for r in read_crawl_shard(pair, outcomes)]
    assert sorted(got) == [("a", "success"), ("b", "success"), ("c", "failed_to_download")]
    # a success is final even if a later shard names the uid again (first success wins)
    again = shard("recrawl2", [("a", "failed_to_download")])
    outcomes = final_outcomes([round0, round1, again])
    assert outcomes["a"] == round1[0]
    assert [r["uid"] for r in read_crawl_shard(again, outcomes)] == []
    # Told each shard's round (a clipline crawl), round 0 is read for the re-crawled uids only: the same map.
    assert final_outcomes([round0, round1, again], rounds=[0, 1, 2]) == outcomes
    assert final_outcomes([round0, round1], rounds=[0, 1]) == {"a": round1[0], "c": round1[0]}
    assert final_outcomes([round0], rounds=[0]) == {}


def test_write_rows_orders_by_key_and_breaks_ties_on_the_whole_row(tmp_path):
    """The pool files' order never depends on arrival: by uid, rows without one last, equal uids by their content."""
    import json

    from pipelines.images.stage import write_rows

    schema = pa.schema([pa.field("uid", pa.string()), pa.field("reason", pa.string()), pa.field("n", pa.int64())])
    rng = random.Random(5)
    rows = [{"uid": rng.choice(["a", "b", "c", None]), "reason": rng.choice(["x", "y", None]), "n": rng.randrange(4)}
            for _ in range(300)]
    expected = sorted(rows, key=lambda r: (r["uid"] is None, r["uid"] or 0, json.dumps(r, sort_keys=True)))
    written = []
    for i in range(3):
        rng.shuffle(rows)
        written.append(pq.read_table(write_rows(str(tmp_path / f"{i}.parquet"), rows, schema)).to_pylist())
    assert written[0] == written[1] == written[2] == expected


def test_dedup_on_keys_gives_the_rows_exact_then_near_dedup_gives():
    """The images stage decides exact and near duplicates on keys and applies them in its by-file grouping
    (ExactDuplicateKeys + NearDuplicateRoots + _with_duplicates). Expected, computed on whole rows in plain Python:
    per sha256 the smallest uid is kept and the others are its exact duplicates; among the kept rows, each
    near-duplicate component's smallest uid is kept; a uid that appears twice with the same image keeps one row."""
    import json

    from pipelines.images.stage import _with_duplicates
    from pipelines.images.transforms import DUPLICATES, ExactDuplicateKeys, NearDuplicateRoots, reject_row

    rng = random.Random(5)
    shas = [f"{i:064x}" for i in range(25)]
    phash_of = {s: rng.getrandbits(64) for s in shas}
    for s in shas[1::4]:  # near duplicates of another image
        phash_of[s] = phash_of[shas[0]] ^ (1 << rng.randrange(64))
    rows = []
    for i in range(120):
        sha = rng.choice(shas)
        rows.append({"uid": f"u{i:03d}", "sha256": sha, "phash": phash_of[sha], "status": "ok", "stage": None,
                     "reason": None, "duplicate_of": None})
    rows.append(dict(rows[7]))  # one uid twice with the same image: one of the two is kept
    rows.append({"uid": "z", "sha256": None, "phash": None, "status": "rejected", "stage": "images",
                 "reason": checks.DECODE_ERROR, "duplicate_of": None})
    ok_rows = [r for r in rows if r["status"] == "ok"]

    expected, kept = [rows[-1]], {}
    for r in sorted(ok_rows, key=lambda r: r["uid"]):
        if r["sha256"] in kept:
            expected.append(reject_row(r, "dedup", checks.EXACT_DUP, duplicate_of=kept[r["sha256"]]["uid"]))
        else:
            kept[r["sha256"]] = r
    roots = _brute_components([(r["uid"], r["phash"]) for r in kept.values()], RADIUS)
    expected += [reject_row(r, "dedup", checks.NEAR_DUP, duplicate_of=roots[r["uid"]]) if r["uid"] in roots else r
                 for r in kept.values()]
    reasons = [r["reason"] for r in expected]
    assert reasons.count(checks.EXACT_DUP) > 1 and reasons.count(checks.NEAR_DUP) > 1  # both kinds are exercised

    def dumps(r):
        return json.dumps(r, sort_keys=True)

    with TestPipeline(options=make_options()) as p:
        ok = p | beam.Create(ok_rows)
        kept_keys = ok | ExactDuplicateKeys()
        near_roots = kept_keys[OK] | NearDuplicateRoots(RADIUS)
        got = ({"rows": (ok, p | "bad" >> beam.Create(rows[-1:])) | beam.Flatten() | beam.Map(lambda r: (0, r)),
                "roots": near_roots | "rk" >> beam.Map(lambda kv: (0, kv)),
                "dups": kept_keys[DUPLICATES] | "dk" >> beam.Map(lambda kv: (0, kv))}
               | beam.CoGroupByKey() | beam.FlatMap(lambda kv: _with_duplicates(kv[1])))
        assert_that(got | "d" >> beam.Map(dumps), equal_to([dumps(r) for r in expected]))
