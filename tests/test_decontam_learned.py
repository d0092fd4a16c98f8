"""Learned near-duplicate check (CLIP appendix C): training on a tiny set, copy vs look-alike separation, saving it
next to the index, the detector's config switch, and torch staying out of ``pipelines`` imports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.decontam import augment
from pipelines.decontam.detector import DetectorConfig, EvalIndex, find_matches, learned_path

torch = pytest.importorskip("torch")
from pipelines.decontam.learned import LearnedConfig, NearDupEmbedder, thumbs_of, train_embedder  # noqa: E402

TINY = LearnedConfig(steps=120, batch=48, seed=0)


def scene(bg_seed: int, fg_seed: int, size: int = 64) -> Image.Image:
    """Smooth background (from ``bg_seed``) with shapes (from ``fg_seed``): equal bg_seed = same kind of photo."""
    rb, rf = np.random.default_rng(bg_seed), np.random.default_rng(10_000 + fg_seed)
    img = Image.fromarray(rb.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = rf.integers(0, size - 10, 2)
        w, h = rf.integers(8, size // 2, 2)
        col = tuple(int(c) for c in rf.integers(0, 256, 3))
        (d.ellipse if rf.random() < 0.5 else d.rectangle)((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=col)
    return img


@pytest.fixture(scope="module")
def evals():
    return [scene(i, i) for i in range(48)]


@pytest.fixture(scope="module")
def net(evals):
    return train_embedder(thumbs_of(evals), TINY)


def test_training_is_deterministic_and_round_trips(tmp_path, evals, net):
    again = train_embedder(thumbs_of(evals[:16]), LearnedConfig(steps=3, batch=8, seed=1))
    twice = train_embedder(thumbs_of(evals[:16]), LearnedConfig(steps=3, batch=8, seed=1))
    assert all(np.array_equal(again.state[k], twice.state[k]) for k in again.state)
    path = str(tmp_path / "net.npz")
    net.save(path)
    back = NearDupEmbedder.load(path)
    assert back.cfg == net.cfg
    assert np.allclose(back.embed(evals[:4]), net.embed(evals[:4]), atol=1e-6)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz"):
        NearDupEmbedder.load(str(tmp_path / "junk.npz"))
    with pytest.raises(ValueError, match="64, 64"):
        train_embedder(np.zeros((3, 32, 32), np.uint8))


def test_planted_copy_is_closer_than_lookalike(evals, net):
    rng = np.random.default_rng(5)
    e = net.embed(evals)
    wins = 0
    for i in range(16):
        src = evals[i]
        copy = augment.apply(["crop", "jpeg", "mirror", "pad", "colour", "banner", "rotate", "resize"][i % 8], src, rng)
        lookalike = scene(i, 500 + i)  # same background, other shapes: a look-alike, not a copy
        c_copy, c_look = (net.embed([im])[0] @ e[i] for im in (copy, lookalike))
        wins += c_copy > c_look
    assert wins >= 14, f"copy closer than look-alike in only {wins}/16 cases"


def test_detector_uses_learned_check_and_can_switch_it_off(tmp_path, evals, net):
    index = EvalIndex.build(("toy", f"e{i}", im) for i, im in enumerate(evals))
    index.attach_learned(net)
    rng = np.random.default_rng(3)
    pool = [(f"copy-of-e{i}", augment.apply("crop", evals[i], rng)) for i in range(8)]
    pool += [(f"lookalike{i}", scene(i, 900 + i)) for i in range(8)]
    on = list(find_matches(index, pool, DetectorConfig(learned=True, min_cos=-1.0)))  # every hand-checked match, with its cosine
    assert on and all(m.cos is not None for m in on)
    off = list(find_matches(index, pool, DetectorConfig(learned=False)))
    assert all(m.cos is None for m in off)
    assert {(m.pool_key, m.eval_id) for m in on} == {(m.pool_key, m.eval_id) for m in off}
    # A strict cosine threshold can only remove matches.
    strict = list(find_matches(index, pool, DetectorConfig(learned=True, min_cos=0.999)))
    assert {m.pool_key for m in strict} <= {m.pool_key for m in on}
    # Saved next to the index and loaded with it; a later save without a net removes the stale file.
    path = str(tmp_path / "idx.npz")
    index.save(path)
    assert learned_path(path).endswith("idx.neardup.npz")
    back = EvalIndex.load(path)
    assert back.embedder is not None and np.allclose(back.emb, index.emb, atol=1e-6)
    EvalIndex.build([("toy", "e0", evals[0])]).save(path)
    assert EvalIndex.load(path).embedder is None


def test_pipelines_do_not_import_torch():
    code = ("import sys; import pipelines.decontam, pipelines.decontam.detector, pipelines.decontam.audit, "
            "pipelines.decontam.learned; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
