"""Shared test fixtures: ../shared/data location, the S3 endpoint (moto server), quiet third-party noise."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from tests.s3_fixtures import *  # noqa: E402,F401,F403 - session-scoped moto server fixtures

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("CLIPLINE_SHARED_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present")
    return path


class _DropNoise(logging.Filter):
    def filter(self, record):
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropNoise())
