"""CLIP-score filtering: the pure selection rule (every uid is kept or dropped, never both; threshold and DataComp's
top fraction; NaN dropped; deterministic ties), the filter-spec parser, and `score_dataset` on a small build-like
directory (scores equal a hand computation with the model's own preprocessing; reuse through a completion marker)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clip_train.checkpoint import atomic_write_json, save_checkpoint
from clip_train.clip_score import clip_score_drops, parse_clip_score_filter, read_scores, score_dataset
from clip_train.model import CLIP, load_config
from clip_train.shards import synthetic_shape_samples, write_shards
from clip_train.tokenizer import CLIPTokenizer
from pipelines.core.errors import ConfigError


def test_drops_partition_the_uids_threshold():
    rng = np.random.default_rng(0)
    uids = [f"u{i}" for i in range(500)]
    scores = rng.uniform(-0.2, 0.5, 500).tolist()
    scores[7] = float("nan")
    drops = clip_score_drops(uids, scores, threshold=0.2)
    kept = [u for u in uids if u not in drops]
    assert drops | set(kept) == set(uids) and not drops & set(kept)
    assert all(scores[int(u[1:])] >= 0.2 for u in kept)
    assert all(math.isnan(scores[int(u[1:])]) or scores[int(u[1:])] < 0.2 for u in drops)
    assert "u7" in drops


def test_top_fraction_keeps_the_best_and_breaks_ties_by_uid():
    uids = [f"u{i:03d}" for i in range(10)]
    scores = [0.1, 0.9, 0.5, 0.5, 0.5, 0.3, float("nan"), 0.8, 0.2, 0.5]
    drops = clip_score_drops(uids, scores, top_fraction=0.3)
    assert set(uids) - drops == {"u001", "u007", "u002"}  # 0.9, 0.8, then the first 0.5 by uid
    assert len(drops) == 7
    assert clip_score_drops(uids, scores, top_fraction=1.0) == {"u006"}  # an unscored sample is never kept
    shuffled = list(zip(uids, scores))[::-1]
    assert clip_score_drops([u for u, _ in shuffled], [s for _, s in shuffled], top_fraction=0.3) == drops


def test_rule_and_spec_errors():
    assert parse_clip_score_filter("clip_score:threshold=0.28") == {"threshold": 0.28}
    assert parse_clip_score_filter("clip_score:top_fraction=0.3") == {"top_fraction": 0.3}
    for bad in ("clip_score", "clip_score:top=0.3", "clip_score:threshold=x", "clip_score:top_fraction=0",
                "clip_score:top_fraction=1.5", "clip_score:threshold=2", "aesthetic:threshold=0.1"):
        with pytest.raises(ConfigError):
            parse_clip_score_filter(bad)
    with pytest.raises(ConfigError):
        clip_score_drops(["a"], [0.1])
    with pytest.raises(ConfigError):
        clip_score_drops(["a"], [0.1], threshold=0.1, top_fraction=0.5)
    with pytest.raises(ValueError, match="unique"):
        clip_score_drops(["a", "a"], [0.1, 0.2], threshold=0.0)


@pytest.fixture(scope="module")
def build_and_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    samples = synthetic_shape_samples(40, seed=2)
    write_shards(samples, root / "build" / "shards", samples_per_shard=16)
    (root / "build" / "manifest.json").write_text("{}")
    tokenizer = CLIPTokenizer.train([s.caption for s in samples], vocab_size=600)
    cfg = load_config("tiny")
    cfg.vision_cfg.image_size, cfg.vision_cfg.layers, cfg.text_cfg.layers = 32, 1, 1
    cfg.text_cfg.vocab_size, cfg.text_cfg.eot_token_id = tokenizer.vocab_size, tokenizer.eot_token_id
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    run = root / "run"
    run.mkdir()
    atomic_write_json(run / "config.json", {"model": "tiny", "model_config": cfg.to_dict()})
    save_checkpoint(run / "checkpoint.pt", {"model": model.state_dict(), "step": 0})
    tokenizer.save(run / "tokenizer.json")
    return root, samples, model, tokenizer


def test_score_dataset_matches_hand_computation_and_reuses(build_and_run):
    root, samples, model, tokenizer = build_and_run
    result = score_dataset(str(root / "run"), str(root / "build"), batch_size=7)
    out = root / "build" / "clip_score" / "scores.parquet"
    assert result["out"] == str(out) and result["n"] == 40 and result["n_unscored"] == 0 and not result["reused"]
    uids, scores, meta = read_scores(str(out))
    assert sorted(uids) == sorted(s.key for s in samples)
    assert meta["clipline.model_format"] == "clipline-run" and len(meta["clipline.model_fingerprint"]) == 64
    from clip_train.transforms import EvalTransform

    by_uid = dict(zip(uids, scores))
    with torch.no_grad():
        for s in samples[:5]:
            import io

            x = EvalTransform(32)(Image.open(io.BytesIO(s.jpeg)))[None]
            i = model.encode_image(x, normalize=True)[0]
            t = model.encode_text(tokenizer([s.caption]), normalize=True)[0]
            assert by_uid[s.key] == pytest.approx(float(i @ t), abs=1e-5)
    # a rerun with the same model and shards reuses the file; deleting it makes the next run score again
    assert score_dataset(str(root / "run"), str(root / "build"))["reused"] is True
    out.unlink()
    assert score_dataset(str(root / "run"), str(root / "build"))["reused"] is False
    # every scored uid ends kept or dropped by the rule
    drops = clip_score_drops(uids, scores, top_fraction=0.25)
    assert len(drops) == 30 and set(uids) - drops == set(sorted(uids, key=lambda u: -by_uid[u])[:10])


def test_score_requires_a_build_or_out(build_and_run, tmp_path):
    from clip_train.errors import EvalError

    root, _, _, _ = build_and_run
    with pytest.raises(EvalError, match="--out"):
        score_dataset(str(root / "run"), str(root / "build" / "shards"))
    result = score_dataset(str(root / "run"), str(root / "build" / "shards"), out=str(tmp_path / "s.parquet"))
    assert json.loads(json.dumps(result))["n"] == 40
