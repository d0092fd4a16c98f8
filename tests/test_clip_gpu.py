"""GPU paths of the trainer: bf16 autocast, fused AdamW, gradient checkpointing, torch.compile (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from clip_train.shards import synthetic_shape_samples, write_shards

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("extra", [[], ["--grad-checkpointing"], ["--compile"]])
def test_tiny_trains_on_gpu_in_bf16(tmp_path, extra):
    from clip_train import evaluate, train

    write_shards(synthetic_shape_samples(256, seed=0), tmp_path / "shards", samples_per_shard=64)
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path / "shards"), "--model", "tiny", "--out", str(out), "--batch-size", "64", "--steps", "30",
            "--lr", "2e-3", "--warmup", "3", "--device", "cuda", "--workers", "2", *extra]
    assert train.main(argv) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    model, _, _ = evaluate.load_model(out, device="cuda")
    assert next(model.parameters()).is_cuda
