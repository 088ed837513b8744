"""Packages that import their public names on first use (so `import wsclip.data.splits` stays light)."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, modules: dict[str, str]):
    """(__getattr__, __dir__, __all__) for `package`, whose names load from their modules when first used.

    modules: module -> its public names, separated by spaces.
    """
    where = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
