"""CLIP-score filtering inside the build (``--filter clip_score:...`` / BuildConfig.clip_filter): the stage runs
after decontamination, every row still ends in a shard or a rejected row, the rule holds between kept and dropped
samples, the model's fingerprint is in the manifest, and the earlier stages are reused."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import synth_build_config

pytestmark = pytest.mark.slow


def _random_run(run: Path, captions: list[str]) -> Path:
    """A tiny clipline run directory with random weights (any model will do for the accounting checked here)."""
    from clip_train.checkpoint import atomic_write_json, save_checkpoint
    from clip_train.model import CLIP, load_config
    from clip_train.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.train(captions, vocab_size=600)
    cfg = load_config("tiny")
    cfg.vision_cfg.image_size, cfg.vision_cfg.layers, cfg.text_cfg.layers = 32, 1, 1
    cfg.text_cfg.vocab_size, cfg.text_cfg.eot_token_id = tokenizer.vocab_size, tokenizer.eot_token_id
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    run.mkdir(parents=True)
    atomic_write_json(run / "config.json", {"model": "tiny", "model_config": cfg.to_dict()})
    save_checkpoint(run / "checkpoint.pt", {"model": model.state_dict(), "step": 0})
    tokenizer.save(run / "tokenizer.json")
    return run


@pytest.fixture(scope="module")
def filtered(synth_build, synth_web_small, tmp_path_factory):
    from flows.build import build_dataset
    from clip_train.filter_stage import ClipScoreConfig

    out_ref, _ = synth_build
    tmp = tmp_path_factory.mktemp("clipfilter")
    out = tmp / "build"
    shutil.copytree(out_ref, out)  # the finished crawl shards are resumed from: nothing is downloaded again
    captions = pq.read_table(synth_web_small["pairs"], columns=["caption"]).column("caption").to_pylist()
    run = _random_run(tmp / "run", [c for c in captions if c])
    cfg = synth_build_config(synth_web_small, out).replace(
        clip_filter=ClipScoreConfig(checkpoint=str(run), top_fraction=0.5, batch_size=16))
    return out, build_dataset(cfg), run


def test_filter_accounting_and_rule(filtered, synth_web_small):
    from clip_train.clip_score import read_scores

    out, summary, _run = filtered
    manifest = json.loads((out / "manifest.json").read_text())
    order = manifest["funnel"]["order"]
    assert order == ["curate", "crawl", "images", "decontam", "clip_score", "balance", "shard"]
    stages = [manifest["funnel"]["stages"][s] for s in order]
    assert all(a["out"] == b["in"] for a, b in zip(stages, stages[1:]))
    assert "clip_score" not in summary["reused"]
    # every input row: a shard row or one rejected row
    raw = pq.read_table(synth_web_small["pairs"])
    tables = [pq.read_table(p).select(["uid", "stage", "reason"]) for p in sorted((out / "rejected").glob("*.parquet"))]
    rejected = pa.concat_tables(tables).to_pylist()
    shard_uids = pa.concat_tables([pq.read_table(p, columns=["uid"]) for p in sorted((out / "shards").glob("*.parquet"))]
                                  ).column("uid").to_pylist()
    assert raw.num_rows == len(shard_uids) + len(rejected)
    dropped = [r["uid"] for r in rejected if r["stage"] == "clip_score"]
    assert dropped and all(r["reason"] == "low_clip_score" for r in rejected if r["stage"] == "clip_score")
    assert not set(dropped) & set(shard_uids)
    # top_fraction=0.5 of the stage's input, by score: every kept sample scores at least as high as every dropped one
    uids, scores, meta = read_scores(str(out / "clip_score" / "scores.parquet"))
    n_in = manifest["funnel"]["stages"]["clip_score"]["in"]
    assert len(uids) == n_in and len(dropped) == n_in - int(0.5 * n_in + 0.5)
    by_uid = dict(zip(uids, scores))
    kept_scores = [by_uid[u] for u in uids if u not in set(dropped)]
    assert min(kept_scores) >= max(by_uid[u] for u in dropped)
    assert set(shard_uids) <= set(uids)  # balance only draws from what the filter kept
    details = manifest["clip_score"]
    assert details["rule"] == "top_fraction=0.5" and details["model"]["format"] == "clipline-run"
    assert details["model"]["fingerprint"] == meta["clipline.model_fingerprint"] and len(meta["clipline.model_fingerprint"]) == 64


def test_a_new_rule_refilters_and_reuses_the_stages_before(filtered, synth_web_small):
    from flows.build import build_dataset
    from clip_train.filter_stage import ClipScoreConfig

    out, first, run = filtered
    stricter = synth_build_config(synth_web_small, out).replace(
        clip_filter=ClipScoreConfig(checkpoint=str(run), top_fraction=0.25, batch_size=16))
    again = build_dataset(stricter)
    assert again["reused"] == ["curate", "crawl", "images", "decontam"]  # only the filter and what follows rerun
    assert again["funnel"]["stages"]["clip_score"]["out"] < first["funnel"]["stages"]["clip_score"]["out"]


def test_cli_filter_errors(synth_web_small, tmp_path):
    base = [sys.executable, "-m", "flows.cli", "build", "-i", str(synth_web_small["pairs"]),
            "-q", str(synth_web_small["querylist"]), "-o", str(tmp_path / "o")]
    for extra, needle in [(["--filter", "clip_score:threshold=0.2"], "clip_filter.checkpoint"),
                          (["--filter", "clip_score:top_fraction=0.3", "--filter-checkpoint",
                            str(tmp_path / "nope")], "no such checkpoint")]:
        res = subprocess.run(base + extra, capture_output=True, text=True)
        assert res.returncode == 2, res.stderr[-1500:]
        assert needle in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
