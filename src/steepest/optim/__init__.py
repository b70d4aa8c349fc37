"""One module per method (or close family). Importing this package imports every module in it, and
each module registers its optimizers (steepest.core.registry)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
