"""One module per method; importing this package imports (and so registers) every module in it, whatever its
name: adding a method is adding a module (docs/architecture.md, "Add a method")."""

import importlib
import pkgutil

from raydebias.core import get_method, registered

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["get_method", "registered"]
