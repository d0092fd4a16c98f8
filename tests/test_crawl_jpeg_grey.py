"""pipelines.crawl.processing.JPEG_GREY: the published JPEG decoded by OpenCV and converted to grey by Pillow gives
Pillow's own grey image bit for bit (so the crawl's hashes stay imagehash's); anything else, and any disagreement,
goes back to Pillow."""
from __future__ import annotations

import io

import cv2
import imagehash
import numpy as np
import pytest
from PIL import Image

from pipelines.crawl import processing
from pipelines.crawl.processing import _JpegGrey, image_columns


def _photo(rng, h, w, channels):
    """Smooth content plus noise, like a photo thumbnail (not flat blocks that any decoder gets right)."""
    base = rng.integers(0, 255, (6, 6, channels), dtype=np.uint8)
    arr = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)
    return np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)


def _jpegs():
    """What the crawl publishes (img2dataset's Resizer: cv2.imencode) and JPEGs from Pillow, colour and grey,
    odd sizes, several qualities and chroma subsamplings."""
    rng = np.random.default_rng(11)
    out = []
    for i in range(60):
        h, w = int(rng.integers(8, 260)), int(rng.integers(8, 260))
        channels = 1 if i % 5 == 0 else 3
        arr = _photo(rng, h, w, channels)
        if i % 2:
            ok, enc = cv2.imencode(".jpg", arr if channels == 3 else arr[..., 0],
                                   [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 100))])
            assert ok
            out.append(enc.tobytes())
        else:
            img = Image.fromarray(arr if channels == 3 else arr[..., 0])
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(rng.integers(60, 100)), subsampling=int(rng.integers(0, 3)),
                     progressive=bool(i % 4 == 0))
            out.append(buf.getvalue())
    return out


def test_opencv_decode_gives_pillows_grey_image_and_imagehashs_bits():
    grey = _JpegGrey()
    grey.VERIFY_FIRST, grey.VERIFY_EVERY = 0, 10**9  # no checking against Pillow: compare everything here
    for data in _jpegs():
        fast = grey(data, 10**8)
        assert fast is not None
        img = Image.open(io.BytesIO(data))
        ref = img if img.mode == "L" else img.convert("L")
        assert fast[0].size == ref.size == (fast[1], fast[2])
        assert fast[0].tobytes() == ref.tobytes()
    assert grey.enabled and grey.mismatches == 0
    for data in _jpegs()[:20]:
        cols = image_columns(data, 10**8)
        published = Image.open(io.BytesIO(data))
        assert cols["phash"] == int(str(imagehash.phash(published)), 16)
        assert cols["dhash"] == int(str(imagehash.dhash(published)), 16)


def test_not_a_complete_jpeg_goes_to_pillow_with_the_same_outcome():
    data = _jpegs()[1]
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, "PNG")
    grey = _JpegGrey()
    assert grey(png.getvalue(), 10**8) is None
    assert grey(data[: len(data) // 2], 10**8) is None  # truncated: no end-of-image marker
    assert grey(data, 10) is None  # more pixels than allowed
    truncated = image_columns(data[: len(data) // 2], 10**8)
    assert truncated["img_error"] is not None and truncated["phash"] is None


def test_a_disagreement_with_pillow_switches_the_process_to_pillow(monkeypatch):
    grey = _JpegGrey()
    monkeypatch.setattr(processing, "JPEG_GREY", grey)
    real = cv2.imdecode

    def off_by_one(buf, flags):
        out = real(buf, flags)
        out[0, 0, :] ^= 64  # a decoder that differs in one pixel
        return out

    monkeypatch.setattr(cv2, "imdecode", off_by_one)
    datas = _jpegs()[:6]
    cols = [image_columns(d, 10**8) for d in datas]
    assert grey.mismatches == 1 and not grey.enabled
    for d, c in zip(datas, cols):
        published = Image.open(io.BytesIO(d))
        assert c["phash"] == int(str(imagehash.phash(published)), 16)
        assert c["dhash"] == int(str(imagehash.dhash(published)), 16)


@pytest.mark.parametrize("n", [1, 64, 65, 256, 512])
def test_checked_against_pillow_on_the_first_images_and_then_one_in_256(monkeypatch, n):
    grey = _JpegGrey()
    checks = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: (checks.append(1), real_open(*a, **k))[1])
    data = _jpegs()[1]
    for _ in range(n):
        assert grey(data, 10**8) is not None
    assert len(checks) == min(n, 64) + n // 256  # images 1-64, then 256, 512, ...
