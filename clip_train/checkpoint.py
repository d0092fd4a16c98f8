"""Run-directory checkpoints: atomic save of the training state, and loading a trained model for evaluation.

A run directory may be a local path or an ``s3://`` prefix: every read and write goes through
:mod:`pipelines.core.storage` (temp file + rename locally, one PUT / multipart upload on S3).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_train.errors import CheckpointError
from clip_train.model import CLIP, CLIPConfig
from clip_train.tokenizer import CLIPTokenizer
from pipelines.core import storage

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
RUN_FILES = (CONFIG_NAME, CHECKPOINT_NAME, TOKENIZER_NAME)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    storage.write_bytes_atomic(str(path), data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save whole or not at all (temp file + fsync + rename, or one upload): a reader never sees half a file."""
    storage.write_stream_atomic(str(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = str(path)
    if not storage.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    with storage.open_read(path) as f:
        data = io.BytesIO(f.read())
    # weights_only=False: the state holds optimiser/RNG objects written by this trainer, not untrusted pickles.
    return torch.load(data, map_location=map_location, weights_only=False)


def is_run_dir(path: str | Path) -> bool:
    path = str(path)
    return storage.exists(storage.join(path, CONFIG_NAME)) and storage.exists(storage.join(path, CHECKPOINT_NAME))


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, CLIPTokenizer, dict]:
    """(model in eval mode on device, tokenizer, config.json + the checkpoint's "step") of a training run directory."""
    run_dir = str(run_dir)
    config_path = storage.join(run_dir, CONFIG_NAME)
    if not storage.exists(config_path):
        raise CheckpointError(f"{run_dir} is not a training run: {CONFIG_NAME} is missing")
    try:
        config = json.loads(storage.read_bytes(config_path))
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: not JSON ({exc})") from None
    if "model_config" not in config:
        raise CheckpointError(f"{config_path}: expected a 'model_config' entry written by clip_train.train")
    model = CLIP(CLIPConfig.from_dict(config["model_config"]))
    state = load_checkpoint(storage.join(run_dir, CHECKPOINT_NAME))
    model.load_state_dict(state["model"])
    tokenizer = CLIPTokenizer.load(storage.join(run_dir, TOKENIZER_NAME))
    config["step"] = state["step"]  # the step the loaded weights were saved at
    return model.to(device).eval(), tokenizer, config
