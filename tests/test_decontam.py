"""Near-duplicate detector: hashing parity with imagehash, multi-index search, each copy transform, look-alikes,
and the Beam decontamination step on the DirectRunner."""
from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipelines.decontam import augment
from pipelines.decontam.detector import DetectorConfig, EvalIndex, find_matches
from pipelines.decontam.hashing import dhash64_batch, hamming, phash64_batch, to_hex
from pipelines.decontam.mih import MultiIndexHash, brute_force_search
from pipelines.decontam.transform import Decontaminate, build_index, decontaminate_pool


def scene(seed: int, size: int = 64) -> Image.Image:
    """A random 'photo': smooth background plus random ellipses and bars, distinct per seed."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, size // 2, 2)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=col)
    return img


def jpeg_bytes(img: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


@pytest.fixture(scope="module")
def eval_images():
    return {f"e{i}": scene(i) for i in range(60)}


@pytest.fixture(scope="module")
def index(eval_images):
    return EvalIndex.build(("toy", k, im) for k, im in eval_images.items())


def test_batched_hashes_reproduce_imagehash():
    imgs = [scene(100 + i, size=s) for i, s in enumerate([17, 32, 64, 200, 333])] + [scene(7).convert("L")]
    ph, dh = phash64_batch(imgs), dhash64_batch(imgs)
    assert [to_hex(h) for h in ph] == [str(imagehash.phash(im)) for im in imgs]
    assert [to_hex(h) for h in dh] == [str(imagehash.dhash(im)) for im in imgs]
    assert hamming(ph[0], ph[0]) == 0
    assert int(hamming(ph[0], ph[1])) == imagehash.phash(imgs[0]) - imagehash.phash(imgs[1])


@pytest.mark.parametrize("n_blocks", [2, 3, 4, 6])
def test_multi_index_equals_brute_force(n_blocks):
    rng = np.random.default_rng(n_blocks)
    base = rng.integers(0, 2**63, 3000, dtype=np.uint64) ^ (rng.integers(0, 2, 3000, dtype=np.uint64) << np.uint64(63))
    q = base[rng.integers(0, 3000, 800)].copy()
    for j in range(len(q)):  # flip 0..12 random bits
        for b in rng.choice(64, int(rng.integers(0, 13)), replace=False):
            q[j] ^= np.uint64(1) << np.uint64(int(b))
    mih = MultiIndexHash(base, n_blocks=n_blocks)
    for r in (0, 4, 9):
        got, want = mih.search(q, r), brute_force_search(q, base, r)
        order = np.lexsort((want[1], want[0]))
        assert np.array_equal(got[0], want[0][order]) and np.array_equal(got[1], want[1][order])
        assert np.array_equal(got[2], want[2][order])


@pytest.mark.parametrize("family", sorted(augment.TRANSFORMS))
def test_each_transform_family_is_found(family, eval_images, index):
    rng = np.random.default_rng(sorted(augment.TRANSFORMS).index(family))  # explicit seed per family
    keys = sorted(eval_images)[:20]
    items = [(f"copy-of-{k}", augment.apply(family, eval_images[k], rng)) for k in keys]
    cfg = DetectorConfig()
    matches = list(find_matches(index, items, cfg))
    found = {(m.pool_key, m.eval_id) for m in matches}
    recall = np.mean([(f"copy-of-{k}", k) in found for k in keys])
    wrong = [m for m in matches if m.pool_key != f"copy-of-{m.eval_id}"]
    # A hue rotation of up to 40 degrees reorders the grey levels of these saturated random shapes (the detector
    # matches grey images), so some re-coloured copies fall below the checks; natural photos are far less
    # saturated (docs/benchmarks_decontam.md has the CIFAR-10 figures).
    floor = 0.75 if family == "colour_shift" else 0.9
    assert recall >= floor, f"{family}: recall {recall:.2f}"
    assert not wrong, f"{family}: wrong matches {wrong[:3]}"
    m = next(m for m in matches if m.pool_key == f"copy-of-{m.eval_id}")
    assert m.eval_set == "toy" and m.found_by in ("hash", "descriptor", "both")
    assert (m.distance == -1) == (m.found_by == "descriptor") and m.distance <= cfg.radius
    assert m.verified_by in ("variant", "align") and m.desc_cos is not None


def _sky(seed):
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(120, 255, 3), rng.integers(60, 200, 3)
    t = np.linspace(0, 1, 64)[:, None, None]
    arr = top * (1 - t) + bottom * t + rng.normal(0, 1.5, (64, 64, 3))
    return Image.fromarray(np.clip(np.broadcast_to(arr, (64, 64, 3)), 0, 255).astype(np.uint8))


def _text(seed):
    """Black text on white; different seeds give different words on every line."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (96, 64), "white")
    d = ImageDraw.Draw(img)
    for row in range(3):
        word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(5, 11))))
        d.text((4, 6 + 18 * row), word, fill="black", font=ImageFont.load_default(size=13))
    return img


def _black(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(rng.normal(4, 2, (48, 64, 3)), 0, 255).astype(np.uint8))


def test_lookalike_negatives_do_not_match():
    lookalikes = {f"sky{i}": _sky(i) for i in range(8)}
    lookalikes.update({f"text{i}": _text(i) for i in range(8)})
    lookalikes.update({f"black{i}": _black(i) for i in range(4)})
    idx = EvalIndex.build(("lookalikes", k, im) for k, im in lookalikes.items())
    pool = [(f"sky-pool{i}", _sky(100 + i)) for i in range(8)]
    pool += [(f"text-pool{i}", _text(100 + i)) for i in range(8)]
    pool += [(f"black-pool{i}", _black(100 + i)) for i in range(4)]
    pool += [(f"scene{i}", scene(1000 + i)) for i in range(20)]
    # Stage 1 alone collides on these (same low-frequency layout): the stricter check is what rejects them.
    # (At the wider radius 10, where more of them collide.)
    cands = list(find_matches(idx, pool, DetectorConfig(radius=10, verify=False)))
    assert len(cands) >= 1
    assert list(find_matches(idx, pool, DetectorConfig(radius=10))) == []
    assert list(find_matches(idx, pool)) == []


def test_identical_text_images_still_match():
    img = _text(3)
    idx = EvalIndex.build([("t", "doc", img)])
    assert [m.eval_id for m in find_matches(idx, [("copy", augment.apply("resize", img, np.random.default_rng(0)))])] == ["doc"]


def test_unreadable_pool_image_is_reported(index, eval_images):
    errors: list[str] = []
    table = decontaminate_pool([("bad", b"not an image"), ("good", jpeg_bytes(eval_images["e3"]))], index, errors=errors)
    assert table.column("pool_key").to_pylist() == ["good"] and table.column("eval_id").to_pylist() == ["e3"]
    assert len(errors) == 1 and errors[0].startswith("bad:")


def test_index_round_trip(tmp_path, index):
    path = str(tmp_path / "idx.npz")
    index.save(path)
    back = EvalIndex.load(path)
    assert back.ids == index.ids and np.array_equal(back.hashes, index.hashes) and back.sizes == {"toy": 60}
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz"):
        EvalIndex.load(str(tmp_path / "junk.npz"))


def test_beam_decontaminate_on_direct_runner(tmp_path, eval_images):
    import apache_beam as beam
    from pipelines.core.beam import make_options
    from apache_beam.testing.util import assert_that, equal_to

    folder = tmp_path / "evalset" / "only"
    folder.mkdir(parents=True)
    for k in ("e1", "e2", "e5"):
        eval_images[k].save(folder / f"{k}.png")
    index_path = str(tmp_path / "index.npz")
    build_index([f"folder:{tmp_path / 'evalset'}"], index_path)
    rng = np.random.default_rng(0)  # explicit: the planted copies are the same on every run
    records = [{"uid": "u-copy1", "jpg": jpeg_bytes(augment.apply("crop", eval_images["e1"], rng))},
               {"uid": "u-copy5", "jpg": jpeg_bytes(augment.apply("mirror", eval_images["e5"], rng))},
               {"uid": "u-bad", "jpg": b"\xff\xd8broken"}]
    records += [{"uid": f"u-other{i}", "jpg": jpeg_bytes(scene(500 + i))} for i in range(6)]
    with beam.Pipeline(options=make_options()) as p:
        out = p | beam.Create(records) | Decontaminate(index_path)
        assert_that(out.kept | "KeptUids" >> beam.Map(lambda r: r["uid"]),
                    equal_to([f"u-other{i}" for i in range(6)]), label="kept")
        assert_that(out.matches | beam.Map(lambda m: (m["pool_key"], m["eval_id"])),
                    equal_to([("u-copy1", "only/e1.png"), ("u-copy5", "only/e5.png")]), label="matches")
        assert_that(out.rejected | beam.Map(lambda r: (r["uid"], r["reason"].split(" (")[0])),
                    equal_to([("u-copy1", "near-duplicate of an evaluation image"),
                              ("u-copy5", "near-duplicate of an evaluation image"),
                              ("u-bad", "unreadable image")]), label="rejected")


def test_multi_index_with_crowded_buckets_equals_brute_force():
    """Many equal and near-equal hashes (as an index of correlated variants holds): buckets overflow their slots."""
    rng = np.random.default_rng(7)
    uniq = rng.integers(0, 2**64, 150, dtype=np.uint64)
    base = uniq[rng.integers(0, 150, 4000)]
    base[::3] ^= np.uint64(1) << rng.integers(40, 64, len(base[::3])).astype(np.uint64)  # low blocks stay crowded
    q = base[rng.integers(0, 4000, 300)] ^ (np.uint64(1) << rng.integers(0, 64, 300).astype(np.uint64))
    for n_blocks in (3, 4):
        mih = MultiIndexHash(base, n_blocks=n_blocks)
        assert max(s.shape[1] for s in mih.slots if s is not None) > 1
        for r in (0, 3, 7):
            got, want = mih.search(q, r), brute_force_search(q, base, r)
            order = np.lexsort((want[1], want[0]))
            assert np.array_equal(got[0], want[0][order]) and np.array_equal(got[1], want[1][order])
            assert np.array_equal(got[2], want[2][order])


def _bird_on_sky(seed: int, at=(0.5, 0.45), size: int = 32) -> Image.Image:
    """A plain 'photo': a smooth sky ramp with one small dark bird (a few pixels): a person identifies its copies at
    once, but it has too few edges for the structure requirement (mean gradient < 4 on the checks' grids)."""
    sky = np.asarray(_sky(seed).resize((size, size), Image.Resampling.BILINEAR)).copy()
    img = Image.fromarray(sky)
    d = ImageDraw.Draw(img)
    x, y = at[0] * size, at[1] * size
    s = size / 32
    d.polygon([(x - 5 * s, y - 2 * s), (x, y + s), (x + 5 * s, y - 2 * s), (x + 1 * s, y + 2.5 * s),
               (x - 1 * s, y + 2.5 * s)], fill=(25, 25, 35))
    return img


def test_plain_image_copies_pass_by_their_residual_and_skies_do_not():
    from pipelines.decontam.align import AlignConfig, align, prepare_eval, prepare_query

    cfg = AlignConfig()
    src = _bird_on_sky(3)
    thumb = np.asarray(src.convert("L").resize((64, 64), Image.Resampling.BILINEAR))
    copy = augment.apply("jpeg", src.resize((48, 48), Image.Resampling.BICUBIC), np.random.default_rng(0))
    a = align(prepare_eval(thumb), prepare_query(copy.convert("L"), cfg), cfg)
    assert not a.structured  # the structure requirement alone would reject this copy ...
    assert a.residual[0] >= cfg.residual_min_corr and a.passes(cfg), a  # ... its residual (the bird) agrees
    # the same sky with a balloon where the bird was: the residuals disagree; another sky with the same bird: the
    # ramps differ (grey correlation below residual_ncc)
    balloon = Image.fromarray(np.asarray(_sky(3).resize((32, 32), Image.Resampling.BILINEAR)).copy())
    ImageDraw.Draw(balloon).ellipse((13, 10, 19, 18), fill=(200, 40, 40))
    for look in (balloon, _bird_on_sky(4)):
        b = align(prepare_eval(thumb), prepare_query(look.convert("L"), cfg), cfg)
        assert not b.structured and not b.passes(cfg), b
    # and with the rescue off (residual_ncc > 1) the copy is rejected: the rule is what accepts it
    off = AlignConfig(residual_ncc=1.0, residual_min_corr=1.0)
    assert not align(prepare_eval(thumb), prepare_query(copy.convert("L"), off), off).passes(off)


def test_caption_banner_is_found_on_captioned_copies_only():
    from pipelines.decontam.align import caption_banner

    rng = np.random.default_rng(5)
    found = [caption_banner(augment.apply("banner", scene(i), rng).convert("L")) for i in range(20)]
    assert sum(f is not None for f in found) >= 16  # 17 of 20 when written (a caption on a dark or busy edge can be missed)
    assert all(caption_banner(im.convert("L")) is None
               for im in [scene(100 + i) for i in range(20)] + [_sky(i) for i in range(8)] + [_bird_on_sky(1)])
