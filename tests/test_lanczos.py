"""pipelines.decontam.lanczos: Pillow's LANCZOS resize of grey images, bit for bit, on many sizes and contents."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.decontam import lanczos


def _content(rng, h, w, kind):
    if kind == 0:
        return rng.integers(0, 256, (h, w), dtype=np.uint8)  # noise: every weight matters
    if kind == 1:  # flat with hard edges: the clip at 0 and 255 and the negative lobes
        a = np.full((h, w), int(rng.integers(0, 256)), np.uint8)
        a[rng.integers(0, h, 3), :] = 255
        a[:, rng.integers(0, w, 3)] = 0
        return a
    small = rng.integers(0, 256, (5, 5), dtype=np.uint8)  # smooth, photo-like
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def test_equal_to_pillow_on_hundreds_of_sizes():
    rng = np.random.default_rng(12)
    checked = 0
    for trial in range(300):
        h, w = int(rng.integers(1, 600)), int(rng.integers(1, 600))
        a = _content(rng, h, w, trial % 3)
        img = Image.fromarray(a)
        other = (int(rng.integers(1, 700)), int(rng.integers(1, 700)))  # down and up, either axis
        sizes = [(32, 32), (9, 8), other, (w, int(rng.integers(1, 64))), (int(rng.integers(1, 64)), h)]
        mine = lanczos.resize_grey_exact(a, sizes)
        for size, m in zip(sizes, mine):
            ref = np.asarray(img.resize(size, Image.Resampling.LANCZOS))
            assert m.dtype == np.uint8 and m.shape == ref.shape
            assert np.array_equal(m, ref), (a.shape, size, int((m != ref).sum()))
            checked += 1
    assert checked == 1500


@pytest.mark.parametrize("shape", [(589, 3), (1000, 9), (300, 2), (101, 1), (100, 1), (3, 589), (2, 700), (1, 1)])
def test_equal_to_pillow_on_extreme_shapes(shape):
    # Image.resize resizes an image more than 100 times taller than wide vertically first
    rng = np.random.default_rng(sum(shape))
    for kind in range(3):
        a = _content(rng, *shape, kind)
        img = Image.fromarray(a)
        sizes = [(32, 32), (9, 8), (shape[1], 40), (7, shape[0]), (64, 900)]
        for size, m in zip(sizes, lanczos.resize_grey_exact(a, sizes)):
            assert np.array_equal(m, np.asarray(img.resize(size, Image.Resampling.LANCZOS))), (shape, size)


def test_a_wrong_weight_is_caught():
    # The comparison above can fail: one fixed-point weight off by one changes some output pixel.
    a = np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8)
    good = lanczos.fixed_point_weights(128, 32)
    try:
        bad = good.copy()
        bad[:, 60] += 1 << 14
        lanczos._weights[(128, 32)] = bad
        lanczos._stacked.clear()
        mine = lanczos.resize_grey_exact(a, [(32, 32)])[0]
        assert not np.array_equal(mine, np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.LANCZOS)))
    finally:
        lanczos._weights[(128, 32)] = good
        lanczos._stacked.clear()


def test_resize_grey_checks_each_size_once_and_falls_back_to_pillow_on_a_mismatch(monkeypatch):
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (77, 91), dtype=np.uint8))
    sizes = [(32, 32), (9, 8)]
    ref = [np.asarray(img.resize(s, Image.Resampling.LANCZOS)) for s in sizes]
    key = (91, 77, tuple(sizes))
    lanczos._checked.pop(key, None)
    assert all(np.array_equal(a, b) for a, b in zip(lanczos.resize_grey(img, sizes), ref))
    assert lanczos._checked[key] is True
    # a size whose matrices disagree with Pillow (as if Pillow's C had fused a multiply-add): Pillow from then on
    lanczos._checked.pop(key)
    monkeypatch.setattr(lanczos, "resize_grey_exact", lambda grey, s: [np.zeros((h, w), np.uint8) for w, h in s])
    for _ in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(lanczos.resize_grey(img, sizes), ref))
    assert lanczos._checked[key] is False and key in lanczos.MISMATCHED
    lanczos._checked.pop(key)
    lanczos.MISMATCHED.discard(key)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_crawl_hashes_still_equal_imagehash(mode):
    import io

    import imagehash

    from pipelines.crawl.processing import image_columns

    rng = np.random.default_rng(5)
    for _ in range(30):
        h, w = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        arr = _content(rng, h, w, 2)
        img = Image.fromarray(np.stack([arr, arr[::-1], arr[:, ::-1]], -1) if mode == "RGB" else arr)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        published = Image.open(io.BytesIO(buf.getvalue()))
        cols = image_columns(buf.getvalue(), 10**8)
        assert cols["phash"] == int(str(imagehash.phash(published)), 16)
        assert cols["dhash"] == int(str(imagehash.dhash(published)), 16)
