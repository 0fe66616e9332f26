"""Package names that load on first use (PEP 562).

A package ``__init__`` that imports its torch-backed modules makes every submodule pay for
them: ``vrex.engine.cli``, the `vrex run` parser, would load torch and transformers (seconds)
for ``vrex --help``. Such a package lists its names here instead and imports each on first use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``, whose ``exports`` maps a
    module to the names it defines. In the package's ``__init__``::

        __getattr__, __dir__, __all__ = lazy_exports(__name__, {"vrex.engine.engine": ("Engine",)})

    ``from vrex.engine import Engine`` then imports ``vrex.engine.engine`` at that moment.
    """
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_of[name]), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *module_of})

    return __getattr__, __dir__, sorted(module_of)
