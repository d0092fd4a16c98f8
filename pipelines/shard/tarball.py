"""Deterministic webdataset tar writing: fixed member order and metadata, so identical content gives identical bytes."""
from __future__ import annotations

import io
import tarfile
from typing import BinaryIO

# Fixed member metadata: a tar's bytes depend on its content only (no clock, no user, no umask).
MTIME = 0
MODE = 0o444


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    info.mode = MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def write_samples(fileobj: BinaryIO, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write (key, {ext: bytes}) samples in the given order; members of a sample sorted by extension."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if "." in key:
                raise ValueError(f"webdataset key {key!r} must not contain '.'")
            for ext in sorted(members):
                add_member(tar, f"{key}.{ext}", members[ext])
