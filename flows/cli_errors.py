"""How every ``clipline`` command ends on a user mistake: one line on stderr and exit code 2, never a traceback.

A user mistake is a :class:`pipelines.core.errors.ClipError` (a missing file, a bad row, an unknown spec...);
anything else is a bug and still raises.
"""
from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def run_user(fn, *args, **kwargs):
    """Call fn; a user-facing error becomes a one-line message and exit code 2."""
    from pipelines.core.errors import ClipError

    try:
        return fn(*args, **kwargs)
    except ClipError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
