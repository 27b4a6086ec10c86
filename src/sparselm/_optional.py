"""Packages behind optional extras (`pip install 'sparselm[ray]'`, `'sparselm[hub]'`), imported only where needed."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import SparselmError


def optional_import(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or fail with one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SparselmError(
            f"{purpose} needs the `{module}` package, which is optional: pip install 'sparselm[{extra}]'"
        ) from None
