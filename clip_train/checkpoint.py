"""Run-directory checkpoints: atomic save of the training state, and loading a trained model for evaluation."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_train.model import CLIP, CLIPConfig
from clip_train.tokenizer import CLIPTokenizer

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
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


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save into a temporary file in the same directory, fsync, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only=False: the state holds optimiser/RNG objects written by this trainer, not untrusted pickles.
    return torch.load(path, map_location=map_location, weights_only=False)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, CLIPTokenizer, dict]:
    """(model in eval mode on device, tokenizer, config.json + the checkpoint's "step") of a training run directory."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a training run: {CONFIG_NAME} is missing")
    config = json.loads(config_path.read_text())
    if "model_config" not in config:
        raise ValueError(f"{config_path}: expected a 'model_config' entry written by clip_train.train")
    model = CLIP(CLIPConfig.from_dict(config["model_config"]))
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    model.load_state_dict(state["model"])
    tokenizer = CLIPTokenizer.load(run_dir / TOKENIZER_NAME)
    config["step"] = state["step"]  # the step the loaded weights were saved at
    return model.to(device).eval(), tokenizer, config
