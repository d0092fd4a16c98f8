"""The colour check (pipelines/decontam/colour.py): a re-coloured copy passes, a look-alike with the same grey
silhouette in another hue or without the source's faint background edges does not; in the detector it removes
pairs the grey checks accept; the index keeps its colour thumbnails; its thresholds are validated."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipelines.core.errors import ConfigError
from pipelines.decontam import augment
from pipelines.decontam.colour import compare, query_grid
from pipelines.decontam.detector import DetectorConfig, EvalIndex, find_matches

U = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / np.array([[np.sqrt(2.0)], [np.sqrt(6.0)]])


def scene(colour=(200, 40, 40), wall=True, size=96, seed=0, layout=0) -> Image.Image:
    """A drawn subject (a striped disc and a bar) in front of a room corner (wall, floor, corner line) or, with
    ``wall=False``, in front of one plain fill: the synthetic web's held-out style vs its look-alikes."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (235, 235, 232))
    d = ImageDraw.Draw(img)
    if wall:
        d.rectangle((0, 0, size, int(size * 0.18)), fill=(196, 198, 200))
        d.line((int(size * 0.3), 0, int(size * 0.3), int(size * 0.18)), fill=(150, 152, 155), width=3)
    r = size // 5
    cx, cy = size // 2 + int(rng.integers(-4, 5)), int(size * 0.55) + int(rng.integers(-4, 5))
    if layout:
        cx, cy = int(size * 0.3), int(size * 0.45)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    light = tuple(min(255, c + 70) for c in colour)
    for k in range(-r, r, 8):
        d.line((cx + k, cy - r, cx + k + r // 2, cy + r), fill=light, width=3)
    bar = (0.1, 0.8, 0.45, 0.88) if not layout else (0.6, 0.7, 0.9, 0.95)
    d.rectangle(tuple(int(size * v) for v in bar), fill=(60, 60, 140))
    return img.filter(ImageFilter.GaussianBlur(0.6))


def turn_hue(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate every colour about the grey axis (grey levels' mean kept): a look-alike in another hue."""
    a = np.asarray(img, np.float64)
    mean = a.mean(-1, keepdims=True)
    c = (a - mean) @ U.T
    t = np.radians(degrees)
    rot = c @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    return Image.fromarray(np.clip(mean + rot @ U, 0, 255).round().astype(np.uint8), "RGB")


def _grid(img):
    return query_grid(img)


def test_recoloured_copy_passes_and_other_hue_or_missing_background_does_not():
    src = scene()
    th = DetectorConfig()
    for seed in range(6):
        copy = augment.apply("colour_shift", src, np.random.default_rng(seed))
        s = compare(_grid(src), _grid(copy))
        assert s.passes(th.max_hue_turn, th.min_edge_recall, th.min_edge_blocks), (seed, s)
    grey_copy = augment.apply("grayscale", src, np.random.default_rng(0))
    s = compare(_grid(src), _grid(grey_copy))
    assert s.grey and s.hue_turn is None and s.passes(th.max_hue_turn, th.min_edge_recall, th.min_edge_blocks)
    other_hue = compare(_grid(src), _grid(turn_hue(src, 120)))
    assert other_hue.hue_turn > th.max_hue_turn and not other_hue.passes(th.max_hue_turn, th.min_edge_recall)
    no_wall = compare(_grid(src), _grid(scene(wall=False)))
    assert no_wall.edge_blocks < th.min_edge_blocks
    assert not no_wall.passes(th.max_hue_turn, th.min_edge_recall, th.min_edge_blocks)


def test_detector_drops_lookalikes_the_grey_checks_accept(tmp_path):
    evals = {"red": scene(), "blue": scene((40, 60, 200), seed=1, layout=1)}
    index = EvalIndex.build(("s", k, im) for k, im in evals.items())
    # the red scene's drawing in green on a plain background: the synthetic web's look-alikes of its held-out images
    lookalike = scene((40, 170, 60), wall=False, seed=2)
    pool = [("copy", augment.apply("colour_shift", evals["red"], np.random.default_rng(3))),
            ("lookalike", lookalike),
            ("jpeg", augment.apply("jpeg", evals["blue"], np.random.default_rng(4)))]
    grey_only = {(m.pool_key, m.eval_id) for m in find_matches(index, pool, DetectorConfig(colour=False))}
    assert ("lookalike", "red") in grey_only  # the grey checks alone accept the look-alike ...
    got = {(m.pool_key, m.eval_id) for m in find_matches(index, pool)}
    assert got == {("copy", "red"), ("jpeg", "blue")}  # ... the colour check does not
    # the colour thumbnails survive a round trip of the index
    index.save(str(tmp_path / "idx.npz"))
    back = EvalIndex.load(str(tmp_path / "idx.npz"))
    assert back.cthumbs is not None and np.array_equal(back.cthumbs, index.cthumbs)
    assert {(m.pool_key, m.eval_id) for m in find_matches(back, pool)} == got


def test_a_strong_colour_cast_on_an_exact_structure_is_still_a_copy():
    """Hue limit lifted where grey levels and gradients agree as only a copy's do (DetectorConfig.hue_free_*)."""
    src = scene()
    index = EvalIndex.build([("s", "red", src)])
    # the same picture with every hue turned by 100 degrees and its grey levels kept (a grey shift per pixel)
    luma = np.array([0.299, 0.587, 0.114])
    a, t = np.asarray(src, np.float64), np.asarray(turn_hue(src, 100), np.float64)
    cast = Image.fromarray(np.clip(t + ((a - t) @ luma)[..., None], 0, 255).round().astype(np.uint8), "RGB")
    assert [m.eval_id for m in find_matches(index, [("cast", cast)])] == ["red"]
    strict = DetectorConfig(hue_free_ncc=1.0, hue_free_gncc=1.0)  # hue limit everywhere
    assert list(find_matches(index, [("cast", cast)], strict)) == []


def _sky(cloud_chroma: float) -> Image.Image:
    """A dark aircraft on a sky with iso-luminant cloud blobs: the clouds differ from the sky in hue only, scaled by
    ``cloud_chroma`` (1 = the source; smaller = the same photo with its sky re-toned)."""
    rng = np.random.default_rng(5)
    n = 96
    y, x = np.mgrid[0:n, 0:n] / n
    lum = 150 + 40 * y
    blobs = np.zeros((n, n))
    for _ in range(12):
        cx, cy, r = rng.random(), rng.random() * 0.6, 0.05 + 0.08 * rng.random()
        blobs += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    blobs = np.clip(blobs, 0, 1)
    red = lum - 30 + cloud_chroma * (60 * blobs - 30)
    blue = lum + 40 + cloud_chroma * (-60 * blobs + 30)
    green = (lum - 0.299 * red - 0.114 * blue) / 0.587
    img = Image.fromarray(np.clip(np.stack([red, green, blue], -1), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.polygon([(20, 50), (70, 40), (80, 48), (30, 62)], fill=(40, 45, 50))
    d.polygon([(40, 48), (55, 30), (60, 44)], fill=(60, 60, 70))
    return img.resize((32, 32), Image.Resampling.BILINEAR)


def test_a_retoned_background_is_waived_only_where_grey_structure_agrees_everywhere():
    """DetectorConfig.edge_free_*: a copy whose sky lost most of its cloud colour keeps 0.5 of the source's colour
    edges (the edge check rejects it) while its grey levels, gradients and every structured block agree; the
    waiver accepts it, the hue limit still applies (a hue-turned copy of the same pair is rejected without the
    hue exemption), and a look-alike on another background is not waived."""
    src, retoned = _sky(1.0), _sky(0.25)
    index = EvalIndex.build([("s", "sky", src)])
    assert [m.eval_id for m in find_matches(index, [("retoned", retoned)])] == ["sky"]
    off = DetectorConfig(edge_free_ncc=None, edge_free_gncc=None)
    assert list(find_matches(index, [("retoned", retoned)], off)) == []
    no_hue_exemption = DetectorConfig(hue_free_ncc=1.0, hue_free_gncc=1.0)
    assert list(find_matches(index, [("turned", turn_hue(retoned, 120))], no_hue_exemption)) == []
    lookalike_index = EvalIndex.build([("s", "red", scene())])
    assert list(find_matches(lookalike_index, [("other", scene(wall=False))])) == []


@pytest.mark.parametrize("kw", [{"max_hue_turn": 200.0}, {"min_edge_recall": 1.5}, {"min_edge_blocks": -0.1},
                                {"colour": "yes"}, {"hue_free_gncc": 2.0}, {"edge_free_ncc": 1.5}])
def test_colour_thresholds_are_validated(kw):
    with pytest.raises(ConfigError):
        DetectorConfig(**kw)


def test_a_plain_strip_or_a_shape_is_not_a_caption_banner():
    from PIL import ImageFont

    from pipelines.decontam.align import looks_like_banner

    rng = np.random.default_rng(0)
    plain = 200 + rng.normal(0, 3, (10, 48))  # a look-alike's empty background
    apex = plain.copy()
    apex[4:, 20:28] = 60  # the top of a drawn shape reaching into the strip
    img = Image.new("L", (192, 40), 255)
    ImageDraw.Draw(img).text((8, 6), "best deal", fill=0, font=ImageFont.load_default(size=28))
    text = np.asarray(img.resize((48, 10), Image.Resampling.BILINEAR), np.float32)
    assert looks_like_banner(text)
    assert not looks_like_banner(plain) and not looks_like_banner(apex)


def test_what_a_border_trim_left_out_is_compared_where_it_lands_on_the_source():
    from pipelines.decontam.colour import sample_frame

    thumb = np.asarray(scene().resize((32, 32)), np.uint8)
    # the trimmed query region (middle half) was matched onto the whole evaluation image: the query's border lands
    # outside it and is not compared
    _, valid = sample_frame(thumb, (1.0, 1.0, 0.0, 0.0), (0.25, 0.25, 0.75, 0.75), (0.25, 0.25, 0.75, 0.75))
    assert valid[8:24, 8:24].all() and not valid[:6].any() and not valid[:, :6].any()
    # matched onto the middle of the evaluation image: the border lands on it and is compared
    _, valid = sample_frame(thumb, (0.5, 0.5, 0.25, 0.25), (0.25, 0.25, 0.75, 0.75), (0.25, 0.25, 0.75, 0.75))
    assert valid.all()
    # a strip variant: the rest of the trimmed image (a banner's place) is not compared, the border is
    _, valid = sample_frame(thumb, (0.5, 0.4, 0.25, 0.35), (0.25, 0.35, 0.75, 0.75), (0.25, 0.25, 0.75, 0.75))
    assert not valid[9:11, 12:20].any() and valid[2:6, 12:20].all() and valid[14:22, 12:20].all()


def test_shipped_calibration_report_describes_the_shipped_checks():
    """One source of truth: the calibration report stored with the descriptor weights was made with the screen
    and colour thresholds the code uses (a stale report would describe a detector that no longer exists)."""
    from pipelines.decontam.align import AlignConfig
    from pipelines.decontam.descriptor import default_descriptor

    cal = default_descriptor().meta["calibration"]
    cfg = DetectorConfig()
    assert cal["screen"]["min_screen"] == AlignConfig().min_screen
    assert cal["align_min_gncc_used"] == AlignConfig().min_gncc
    cc = cal["colour_check"]
    assert (cc["max_hue_turn"], cc["min_edge_recall"], cc["min_edge_blocks"]) == (
        cfg.max_hue_turn, cfg.min_edge_recall, cfg.min_edge_blocks)
    assert cc["planted_hue_turn_max"] <= cfg.max_hue_turn
