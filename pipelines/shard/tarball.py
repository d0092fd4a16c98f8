"""Deterministic webdataset tar writing: fixed member order and metadata, so identical content gives identical bytes
(those ``tarfile`` writes for the same members: :mod:`pipelines.core.ustar`)."""
from __future__ import annotations

from typing import BinaryIO

from pipelines.core.ustar import UstarWriter

# Fixed member metadata: a tar's bytes depend on its content only (no clock, no user, no umask).
MTIME = 0
MODE = 0o444


def write_samples(fileobj: BinaryIO, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write (key, {ext: bytes}) samples in the given order; members of a sample sorted by extension."""
    with UstarWriter(fileobj) as tar:
        for key, members in samples:
            if "." in key:
                raise ValueError(f"webdataset key {key!r} must not contain '.'")
            for ext in sorted(members):
                tar.add(f"{key}.{ext}", members[ext], mode=MODE, mtime=MTIME)
