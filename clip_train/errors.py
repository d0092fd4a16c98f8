"""User-facing errors of the training side. Each subclasses :class:`pipelines.core.errors.ClipError`, so the CLI
prints the first line of the message and exits 2 (no traceback)."""

from __future__ import annotations

from pipelines.core.errors import ClipError


class TrainError(ClipError):
    """A `clipline train` invocation that cannot run as asked (run directory in use, bad option, no samples...)."""


class EvalError(ClipError):
    """A `clipline eval` / `score` invocation that cannot run as asked (nothing to evaluate, empty set...)."""


class CheckpointError(ClipError):
    """A checkpoint that cannot be read: unknown format, missing model config or tokenizer, mismatched keys."""


class DataError(ClipError):
    """Shards that cannot be used: no shard matches a spec, invalid sizes.json, no readable samples."""
