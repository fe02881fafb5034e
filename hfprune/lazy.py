"""Names a package imports on first use (PEP 562), so that importing the package stays cheap:
`import hfprune` and `hfprune --help` load neither torch nor transformers until a name needs them.

    _EXPORTS = {"prune_model": "prune", ...}            # name -> the submodule that defines it
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """The module-level `__getattr__` and `__dir__` of `package` (whose globals are `namespace`): a name
    of `exports` is imported from its submodule the first time it is asked for, then kept in `namespace`."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
