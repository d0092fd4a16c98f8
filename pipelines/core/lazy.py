"""Package exports loaded on first use (PEP 562), so that importing one submodule of a package does not import
everything its ``__init__`` re-exports."""
from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]], namespace: dict) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for a package that re-exports the names ``modules`` lists per defining
    module; a loaded name is cached in the package's ``namespace``."""
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
