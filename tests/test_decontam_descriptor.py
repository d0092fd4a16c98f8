"""The copy descriptor and what it adds to the detector: numpy inference equal to the torch training twin, the
shipped weights (fingerprint, thresholds, size), copies vs look-alikes, exact bounded-memory search, the
shift-tolerant alignment check, the detector config contract, and the data plane's imports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.core.errors import ClipError, ConfigError
from pipelines.decontam import augment, knn, procedural
from pipelines.decontam.align import AlignConfig, align, prepare_eval, prepare_query
from pipelines.decontam.calibrate import identifiable
from pipelines.decontam.descriptor import (DEFAULT_WEIGHTS, CopyDescriptor, DescriptorError, default_descriptor,
                                           weights_fingerprint)
from pipelines.decontam.detector import DetectorConfig, EvalIndex, EvalIndexError, find_matches, match_batch

ROOT = Path(__file__).resolve().parents[1]


_STYLES: list[int] = []


def _style(i: int) -> int:
    """The i-th identifiable procedural style no training run used (training used style seeds < 10^10): blurred,
    muted canvases have too little structure for any check and are never matched, by design."""
    s = _STYLES[-1] if _STYLES else 10**11
    while len(_STYLES) <= i:
        s += 1
        img = Image.fromarray(procedural.canvas(s, 0, 48)).resize((32, 32), Image.Resampling.BICUBIC)
        if identifiable(img):
            _STYLES.append(s)
    return _STYLES[i]


def photo(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(procedural.canvas(_style(seed), 0, 48)).resize((size, size), Image.Resampling.BICUBIC)


def lookalike(seed: int, size: int = 32) -> Image.Image:
    """Same style as ``photo(seed)``, another layout: the same kind of picture, not a copy."""
    return Image.fromarray(procedural.canvas(_style(seed), 1, 48)).resize((size, size), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def desc() -> CopyDescriptor:
    return default_descriptor()


@pytest.fixture(scope="module")
def evals():
    return {f"p{i}": photo(i) for i in range(80)}


@pytest.fixture(scope="module")
def index(evals):
    return EvalIndex.build(("toy", k, im) for k, im in evals.items())


def test_shipped_weights_carry_recipe_fingerprint_and_thresholds(desc):
    assert DEFAULT_WEIGHTS.exists() and DEFAULT_WEIGHTS.stat().st_size < 1_500_000  # ships in the package
    assert desc.fingerprint == weights_fingerprint(desc.weights)
    t = desc.meta["thresholds"]
    assert -1 < t["candidate"] < 1 and 0 <= t["margin"] < 1 and t["kth"] >= 1
    assert desc.meta["recipe"]["steps"] > 0 and "descriptor_train" in desc.meta["command"]
    assert desc.meta["calibration"]["suite"]["sources"]  # calibrated, and on what
    assert 64 <= desc.dim <= 256


def test_weights_file_errors(tmp_path, desc):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DescriptorError, match="junk.npz"):
        CopyDescriptor.load(str(tmp_path / "junk.npz"))
    tampered = CopyDescriptor({k: v.copy() for k, v in desc.weights.items()}, dict(desc.meta))
    tampered.weights["fc.b"][0] += 1.0
    tampered.save(str(tmp_path / "tampered.npz"))
    with pytest.raises(DescriptorError, match="fingerprint"):
        CopyDescriptor.load(str(tmp_path / "tampered.npz"))
    assert issubclass(DescriptorError, ClipError)


def test_numpy_inference_equals_the_torch_training_twin(desc):
    torch = pytest.importorskip("torch")
    from pipelines.decontam.descriptor_train import export, make_net, standardise_torch

    torch.manual_seed(0)
    net = make_net(desc.dim)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()
    u8 = np.stack([np.asarray(photo(i).convert("L")) for i in range(12)])
    with torch.no_grad():
        want = torch.nn.functional.normalize(net(standardise_torch(torch.from_numpy(u8))), dim=1).numpy()
    got = CopyDescriptor(export(net), {"fingerprint": "-"}).embed_u8(u8)
    assert np.abs(got - want).max() < 1e-4


def test_training_is_reproducible_and_exports_loadable_weights(tmp_path):
    pytest.importorskip("torch")
    from pipelines.decontam.descriptor_train import TrainRecipe, train

    recipe = TrainRecipe(n_styles=12, steps=2, batch=8, seed=3, dim=64, n_val_styles=8)
    a, b = train(recipe, log=lambda *_: None), train(recipe, log=lambda *_: None)
    assert a.fingerprint == b.fingerprint
    a.save(str(tmp_path / "w.npz"))
    back = CopyDescriptor.load(str(tmp_path / "w.npz"), require_thresholds=False)
    assert back.fingerprint == a.fingerprint and back.dim == 64
    with pytest.raises(DescriptorError, match="thresholds"):
        CopyDescriptor.load(str(tmp_path / "w.npz"))


@pytest.mark.parametrize("family", ["shift", "recrop", "colour_shift", "grayscale", "jpeg"])
def test_copies_are_closer_than_lookalikes(desc, family):
    rng = np.random.default_rng(["shift", "recrop", "colour_shift", "grayscale", "jpeg"].index(family))
    srcs = [photo(200 + i) for i in range(40)]
    e = desc.embed(srcs)
    c = np.sum(desc.embed([augment.apply(family, s, rng) for s in srcs]) * e, axis=1)
    look = np.sum(desc.embed([lookalike(200 + i) for i in range(40)]) * e, axis=1)
    assert np.mean(c > look) >= 0.95, f"{family}: copy closer than its look-alike in {np.mean(c > look):.2f}"
    assert np.mean(c >= desc.threshold("candidate")) >= 0.9  # the calibrated threshold keeps them as candidates


@pytest.mark.parametrize("threshold,topk,block", [(0.6, 3, 1 << 14), (0.0, 5, 1 << 12), (-1.0, 2, 1 << 20)])
def test_blocked_search_equals_brute_force(threshold, topk, block):
    rng = np.random.default_rng(topk)
    e = rng.normal(size=(3000, 24)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    q = e[rng.integers(0, 3000, 400)] + rng.normal(0, 0.4, (400, 24)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best = knn.BestPerEntry.empty(len(e))
    got = knn.search(q, e, threshold, topk, max_block=block, best=best, query_ids=np.arange(400) + 1000)
    want = knn.brute_force(q, e, threshold, topk)
    assert np.array_equal(got.query, want.query) and np.array_equal(got.entry, want.entry)
    assert np.allclose(got.sim, want.sim, atol=1e-5)
    sims = q @ e.T
    assert np.allclose(best.sim, sims.max(axis=0), atol=1e-5)
    assert np.array_equal(best.query, sims.argmax(axis=0) + 1000)
    assert np.bincount(got.query, minlength=400).max() <= topk


def test_alignment_recovers_a_shift_and_rejects_a_lookalike():
    cfg = AlignConfig()
    src = photo(7, size=32)
    a = np.asarray(src)
    moved = Image.fromarray(np.pad(a, ((0, 0), (3, 0), (0, 0)), mode="edge")[:, :32])  # content 3 px to the right
    thumb = np.asarray(src.convert("L").resize((64, 64), Image.Resampling.BILINEAR))
    res = align(prepare_eval(thumb), prepare_query(moved.convert("L"), cfg), cfg)
    assert res.passes(cfg), res
    assert res.offset[0] == pytest.approx(-3 / 32, abs=0.02) and abs(res.offset[1]) < 0.02
    other = align(prepare_eval(thumb), prepare_query(lookalike(7).convert("L"), cfg), cfg)
    assert not other.passes(cfg)
    mirrored = align(prepare_eval(thumb), prepare_query(src.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L"),
                                                        cfg), cfg, mirror=True)
    assert mirrored.passes(cfg) and mirrored.gncc > 0.95


def _screen_reference(ev: np.ndarray, q: np.ndarray, cfg: AlignConfig) -> np.ndarray:
    """Screen scores of one pair at every hypothesis, one hypothesis at a time with align's own sampler."""
    from pipelines.decontam.align import _grid_hyps, _sample

    hyp = _grid_hyps(cfg.min_scale, cfg.max_scale, cfg.screen_scales, cfg.screen_max_offset, cfg.screen_step)
    out = np.full(len(hyp), -1.0)

    def ncc(a, b, m):
        a, b = a[m].astype(np.float64), b[m].astype(np.float64)
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-6))

    for i in range(len(hyp)):
        v, m = _sample(ev, hyp[i:i + 1], cfg.screen_grid)
        v, m = v[0], m[0]
        if m.mean() < cfg.min_overlap:
            continue
        gx = ncc(np.diff(v, axis=1), np.diff(q, axis=1), m[:, 1:] & m[:, :-1])
        gy = ncc(np.diff(v, axis=0), np.diff(q, axis=0), m[1:, :] & m[:-1, :])
        out[i] = (ncc(v, q, m) + (gx + gy) / 2) / 2
    return out


def test_batched_screen_equals_scoring_each_pair_alone():
    """align.screen samples all pairs at all hypotheses with shared interpolation matrices (factored by column and
    row geometry); each pair's best score and seed must be what scoring it alone, hypothesis by hypothesis, gives."""
    from pipelines.decontam.align import _grid_hyps, prepare_screen_query, screen

    cfg = AlignConfig()
    evs, qs = [], []
    for k in range(70):  # more than one chunk of 64
        img = photo(k, size=32).convert("L")
        evs.append(np.asarray(img.resize((32, 32)), np.float32))
        src = photo(k if k % 3 else k + 100, size=32).convert("L")  # every third pair unrelated
        qs.append(prepare_screen_query(src.crop((2, 1, 30, 31)) if k % 2 else src, cfg))
    best, seeds = screen(np.stack(evs), np.stack(qs), cfg)
    hyp = _grid_hyps(cfg.min_scale, cfg.max_scale, cfg.screen_scales, cfg.screen_max_offset, cfg.screen_step)
    for b in range(len(evs)):
        ref = _screen_reference(evs[b], qs[b], cfg)
        assert best[b] == pytest.approx(ref.max(), abs=2e-4)
        for sd in seeds[b]:  # the seeds are hypotheses of the grid, among the best-scoring ones
            i = int(np.flatnonzero((hyp == sd).all(axis=1))[0])
            assert ref[i] >= np.sort(ref)[-cfg.keep] - 2e-4


def test_detector_finds_shifted_copies_that_hashes_miss(evals, index):
    rng = np.random.default_rng(11)
    keys = sorted(evals)[:30]
    items = [(f"copy-of-{k}", augment.apply("shift", evals[k], rng)) for k in keys]
    items += [(f"lookalike-{i}", lookalike(i)) for i in range(30)]
    full = list(find_matches(index, items))
    hashes_only = list(find_matches(index, items, DetectorConfig(descriptor=False, align=False)))
    recall = np.mean([any(m.pool_key == f"copy-of-{k}" and m.eval_id == k for m in full) for k in keys])
    recall_hash = np.mean([any(m.pool_key == f"copy-of-{k}" and m.eval_id == k for m in hashes_only) for k in keys])
    assert recall >= 0.95 and recall > recall_hash
    assert all(m.pool_key == f"copy-of-{m.eval_id}" for m in full), [m for m in full if "lookalike" in m.pool_key]
    assert {m.found_by for m in full} <= {"hash", "descriptor", "both"} and any(m.found_by != "hash" for m in full)
    assert all(m.desc_cos is not None and m.verified_by in ("variant", "align") for m in full)


def test_matching_is_deterministic_and_independent_of_batching(evals, index):
    rng = np.random.default_rng(5)
    items = [(f"c{i}", augment.apply(f, evals[f"p{i}"], rng)) for i, f in
             enumerate(["shift", "recrop", "colour_shift", "pad", "banner", "crop"] * 3)]
    items += [(f"l{i}", lookalike(i)) for i in range(10)]
    one = match_batch(index, [k for k, _ in items], [im for _, im in items], DetectorConfig())
    again = match_batch(index, [k for k, _ in items], [im for _, im in items], DetectorConfig())
    assert one == again
    small = list(find_matches(index, items, DetectorConfig(batch_size=4)))
    assert sorted(small, key=lambda m: (m.pool_key, m.eval_id)) == sorted(one[0], key=lambda m: (m.pool_key, m.eval_id))


def test_index_round_trip_keeps_descriptors_and_checks_their_origin(tmp_path, index, desc):
    path = str(tmp_path / "idx.npz")
    index.save(path)
    back = EvalIndex.load(path)
    assert np.array_equal(back.desc, index.desc) and back.desc_fingerprint == desc.fingerprint
    assert back.descriptor_for(DetectorConfig()) is not None
    other = CopyDescriptor({k: v * 1.01 for k, v in desc.weights.items()}, dict(desc.meta))
    other.meta["fingerprint"] = weights_fingerprint(other.weights)
    other.save(str(tmp_path / "other.npz"))
    with pytest.raises(EvalIndexError, match="rebuild the index"):
        back.descriptor_for(DetectorConfig(descriptor_weights=str(tmp_path / "other.npz")))
    assert back.descriptor_for(DetectorConfig(descriptor=False)) is None


def test_detector_config_validates_values_and_keys():
    with pytest.raises(ConfigError, match="decontam.radiuss"):
        DetectorConfig.from_dict({"radiuss": 8})
    with pytest.raises(ConfigError, match="decontam.verify_cfg.min_nc"):
        DetectorConfig.from_dict({"verify_cfg": {"min_nc": 0.5}})
    for bad in ({"radius": -1}, {"radius": 65}, {"desc_candidate": 1.5}, {"desc_topk": 0}, {"batch_size": 0},
                {"align_cfg": {"min_overlap": 0}}, {"verify_cfg": {"min_gncc": 2}}, {"max_checks": 0}):
        with pytest.raises(ConfigError):
            DetectorConfig.from_dict(bad)
    cfg = DetectorConfig.from_dict({"radius": 10, "verify_cfg": {"min_ncc": 0.8}, "align_cfg": {"min_gncc": 0.6}})
    assert (cfg.radius, cfg.verify_cfg.min_ncc, cfg.align_cfg.min_gncc) == (10, 0.8, 0.6)
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    t = cfg.with_thresholds(min_gncc=0.7, desc_margin=0.2, align_min_ncc=0.9, radius=None)
    assert (t.verify_cfg.min_gncc, t.desc_margin, t.align_cfg.min_ncc, t.radius) == (0.7, 0.2, 0.9, 10)
    with pytest.raises(ConfigError, match="unknown detector thresholds"):
        cfg.with_thresholds(min_gnc=0.1)


def test_data_plane_imports_neither_torch_nor_clip_train():
    code = ("import sys; import pipelines.decontam, pipelines.decontam.detector, pipelines.decontam.audit, "
            "pipelines.decontam.transform, pipelines.decontam.descriptor, pipelines.decontam.align, "
            "pipelines.decontam.calibrate; from pipelines.decontam.descriptor import default_descriptor; "
            "default_descriptor(); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('clip_train')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    src = "\n".join(p.read_text() for p in (ROOT / "pipelines" / "decontam").glob("*.py") if p.name != "build.py")
    assert "import clip_train" not in src and "from clip_train" not in src
    assert "os.replace" not in src


@pytest.mark.parametrize("nearest,floor,block", [(1, 0.3, 1 << 14), (2, 0.5, 1 << 12), (3, -1.0, 1 << 20)])
def test_rank_rule_search_equals_brute_force(nearest, floor, block):
    """The rank rule (a query's nearest entries above a floor are hits whatever their margin) in the blocked
    search: the same pairs as the brute-force reference, and the nearest entry is a hit even where the margin
    rule rejects every pair."""
    rng = np.random.default_rng(nearest)
    e = rng.normal(size=(3000, 24)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    q = e[rng.integers(0, 3000, 300)] + rng.normal(0, 0.6, (300, 24)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    kw = dict(margin=0.9, kth=10, high=0.99, nearest=nearest, floor=floor)  # a margin nothing meets
    got = knn.search(q, e, 0.6, 5, max_block=block, **kw)
    want = knn.brute_force(q, e, 0.6, 5, **kw)
    assert np.array_equal(got.query, want.query) and np.array_equal(got.entry, want.entry)
    sims = q @ e.T
    top = sims.argmax(axis=1)
    hit = {(int(a), int(b)) for a, b in zip(got.query, got.entry)}
    assert all((i, int(top[i])) in hit for i in range(len(q)) if sims[i, top[i]] >= floor)
    assert len(knn.search(q, e, 0.6, 5, margin=0.9, kth=10, high=0.99).query) < len(got.query)


def test_shipped_thresholds_include_the_calibrated_rank_rule(desc):
    t = desc.meta["thresholds"]
    rule = desc.meta["calibration"]["rank_rule"]
    assert (t["nearest"], t["floor"]) == (rule["nearest"], rule["floor"])
    assert rule["wrong_per_query"] <= 0.5  # calibrate.RANK_BUDGET
