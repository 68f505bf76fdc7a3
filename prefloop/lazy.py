"""Deferred imports of the heavy libraries (torch, transformers, tokenizers).

Importing torch and transformers takes several seconds, and most prefloop commands never need them: a
cached rerun of a finished loop only looks artifacts up in the store, ``prefloop ls`` reads manifests.
Stage modules therefore bind these libraries with :func:`deferred_import` instead of ``import``: the
real import happens on the first attribute access (``torch.tensor(...)``), that is, when a stage
actually computes. After that first access, each attribute is cached on the proxy, so hot loops pay a
plain attribute lookup.

Use it together with a ``TYPE_CHECKING`` import so type checkers and editors see the real module::

    if TYPE_CHECKING:
        import torch
    else:
        torch = deferred_import("torch")

(``importlib.util.LazyLoader`` is not used: transformers replaces its own entry in ``sys.modules``
while it loads, which LazyLoader rejects, and LazyLoader is not thread-safe before Python 3.12.)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["deferred_import"]


class DeferredModule:
    """Stands for a module until an attribute is read; then imports it and forwards the read."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_deferred_name", name)

    def _deferred_module(self) -> ModuleType:
        return importlib.import_module(object.__getattribute__(self, "_deferred_name"))

    def __getattr__(self, attribute: str) -> Any:
        # Only called when the attribute is not cached yet (instance dict lookups come first).
        if attribute.startswith("__") and attribute.endswith("__"):
            return getattr(self._deferred_module(), attribute)
        value = getattr(self._deferred_module(), attribute)
        object.__setattr__(self, attribute, value)
        return value

    def __setattr__(self, attribute: str, value: Any) -> None:
        # Tests may patch module attributes (monkeypatch.setattr(torch, ...)): patch the real module.
        setattr(self._deferred_module(), attribute, value)
        self.__dict__.pop(attribute, None)

    def __delattr__(self, attribute: str) -> None:
        delattr(self._deferred_module(), attribute)
        self.__dict__.pop(attribute, None)

    def __repr__(self) -> str:
        return f"<deferred module {object.__getattribute__(self, '_deferred_name')!r}>"


def deferred_import(name: str) -> Any:
    """A stand-in for ``import name`` that imports on first use (see the module docstring)."""
    return DeferredModule(name)
