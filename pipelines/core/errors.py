"""One base class for every error a user can cause (bad input, bad config, unusable output directory...).

The CLI turns any :class:`ClipError` into one line ``error: <first line of the message>`` and exit code 2; anything
else is a bug and keeps its traceback. Stage-specific errors subclass it (``InputError``, ``StorageError``,
``CrawlError``, ``SchemaError``, ...), so a new stage never has to register its errors with the CLI.
"""
from __future__ import annotations


class ClipError(Exception):
    """A user-facing error: the message names the file / row / key and what was expected."""


class ConfigError(ClipError, ValueError):
    """A configuration value or key that cannot be used (unknown key, out-of-range number, unknown runner...)."""
