"""The trainer under torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK): 2 CPU processes, gloo, DDP."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from clip_train.shards import synthetic_shape_samples, write_shards

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from clip_train import train

    assert train.main(argv) == 0


def test_ddp_two_processes_train_and_checkpoint(tmp_path):
    write_shards(synthetic_shape_samples(64, seed=1), tmp_path / "shards", samples_per_shard=16)
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path / "shards"), "--model", "tiny", "--out", str(out), "--batch-size", "8", "--steps", "4",
            "--warmup", "1", "--workers", "0", "--threads", "1", "--device", "cpu", "--save-every", "2", "--local-loss",
            "--gather-with-grad"]
    mp.start_processes(_rank, args=(2, _free_port(), argv), nprocs=2, start_method="spawn")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # written by rank 0 only
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 16
    assert config["steps_per_epoch"] == 4  # 64 samples / (8 per rank x 2 ranks)
    assert (out / "checkpoint.pt").exists() and (out / "tokenizer.json").exists()
