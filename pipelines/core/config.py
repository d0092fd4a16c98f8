"""One way to read configuration: typed dataclasses that validate themselves, built from mappings (YAML, JSON,
CLI flags) by :meth:`Config.from_mapping`, which rejects unknown keys at every level and names the key's path
(``crawl.timout``: unknown key, expected one of ...). Lists become tuples so configs stay hashable.

Subclasses are frozen dataclasses; they check their values in ``__post_init__`` and raise :class:`ConfigError`
(via :func:`check`), so a bad value fails before any work starts, whoever built the config.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pipelines.core.errors import ConfigError

C = TypeVar("C", bound="Config")


def check(ok: bool, where: str, message: str) -> None:
    """Raise ConfigError('<where>: <message>') unless ``ok``."""
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _config_type(tp: Any) -> type | None:
    """The Config subclass a (possibly Optional) annotation names, else None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _config_type(arg)
            if found:
                return found
        return None
    return tp if isinstance(tp, type) and issubclass(tp, Config) else None


def _is_tuple(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(tp))
    return origin is tuple or tp is tuple


def _from_plain_dataclass(tp: type, value: Mapping[str, Any], path: str) -> Any:
    """A dataclass that is not a Config (yet): same unknown-key rule, then its own constructor."""
    names = [f.name for f in dataclasses.fields(tp) if f.init]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"{', '.join(f'{path}.{k}' for k in unknown)}: unknown key; expected one of "
                          f"{', '.join(names)}")
    try:
        return tp(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


class Config:
    """Mixin for frozen config dataclasses: ``from_mapping`` / ``to_dict`` / ``replace``."""

    @classmethod
    def from_mapping(cls: type[C], data: Mapping[str, Any] | None, path: str = "") -> C:
        if isinstance(data, cls):
            return data
        data = dict(data or {})
        if not isinstance(data, dict):
            raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(data) - set(names))
        if unknown:
            where = ", ".join(f"{path}.{k}" if path else str(k) for k in unknown)
            raise ConfigError(f"{where}: unknown key; expected one of {', '.join(names)}")
        required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING and f.name not in data]
        if required:
            where = ", ".join(f"{path}.{k}" if path else str(k) for k in required)
            raise ConfigError(f"{where}: missing (required)")
        kwargs = {}
        for name, value in data.items():
            tp = hints.get(name)
            sub = _config_type(tp)
            key_path = f"{path}.{name}" if path else name
            if sub is not None and (isinstance(value, Mapping) or value is None):
                value = sub.from_mapping(value, key_path) if value is not None else None
            elif isinstance(value, Mapping) and isinstance(tp, type) and dataclasses.is_dataclass(tp):
                value = _from_plain_dataclass(tp, value, key_path)
            elif _is_tuple(tp) and isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{path or cls.__name__}: {exc}") from None

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def merge(*layers: Mapping[str, Any] | None) -> dict:
    """Deep-merge mappings, later layers winning (defaults < file < command-line flags)."""
    out: dict = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
                out[k] = merge(out[k], v)
            else:
                out[k] = v
    return out
