"""Reuse of finished training-side units (evaluation, audit) through :mod:`pipelines.core.markers`.

A unit is reused when its marker exists, the fingerprint matches (files by content hash, everything else by value)
and every file the marker lists still exists. Torch-free, so the flows can import it cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.core import markers, storage


def _part(part: Any) -> Any:
    if isinstance(part, Path):
        part = str(part)
        if storage.exists(part) and not _is_dir(part):
            return ["file", storage.basename(part), storage.sha256_of(part)]
        return ["path", part]
    if isinstance(part, (list, tuple)):
        return [_part(p) for p in part]
    if isinstance(part, dict):
        return {str(k): _part(v) for k, v in part.items()}
    return part


def _is_dir(uri: str) -> bool:
    import os

    return not storage.is_s3(uri) and os.path.isdir(uri)


def fingerprint(*parts: Any) -> str:
    """Identity of a unit's inputs: ``Path`` parts that name files count by content (sha256), not by name or mtime;
    everything else by value. Includes the markers module's code version."""
    return markers.fingerprint(markers.CODE_VERSION, *[_part(p) for p in parts])


def done_before(marker: str | Path, fp: str) -> bool:
    """True when the unit behind ``marker`` finished with this fingerprint and all its listed files exist."""
    return markers.done(str(marker), fp) is not None


def mark_done(marker: str | Path, fp: str, files: list[str] | None = None, result: dict | None = None) -> None:
    """Record a finished unit. ``files`` default: every file in the marker's directory (the unit's outputs)."""
    marker = str(marker)
    if files is None:
        directory = storage.parent(marker)
        files = [f for f in storage.list_prefix(directory) if f != marker and not storage.basename(f).startswith(".")] \
            if storage.exists(directory) or storage.is_s3(directory) else []
    markers.write(marker, fp, [str(f) for f in files], result)


def model_files(checkpoint: str | None) -> list[Path]:
    """The files that define a checkpoint (a run directory's config/checkpoint/tokenizer, or the file itself and
    its config / tokenizer beside it), as Paths for :func:`fingerprint`. Empty for None."""
    if not checkpoint:
        return []
    checkpoint = str(checkpoint)
    run = [storage.join(checkpoint, n) for n in ("config.json", "checkpoint.pt", "tokenizer.json")]
    if all(storage.exists(f) for f in run):
        return [Path(f) for f in run]
    if _is_dir(checkpoint):
        return [Path(f) for f in storage.list_prefix(checkpoint)]
    out = [checkpoint]
    stem = storage.basename(checkpoint).rsplit(".", 1)[0]
    for name in (f"{stem}.json", "open_clip_config.json", f"{stem}-tokenizer.json", f"{stem}-bpe.txt.gz"):
        f = storage.join(storage.parent(checkpoint) or ".", name)
        if storage.exists(f):
            out.append(f)
    return [Path(f) for f in out]
