"""steepest: optimizers from the literature, instruments to look inside training, and an honest benchmark."""

from . import averaging, schedules
from . import optim as _optim  # noqa: F401 - importing registers every optimizer
from .core.base import Optimizer
from .core.registry import REGISTRY, get, methods

__version__ = "0.1.0"

# Every registered optimizer is importable as steepest.ClassName.
globals().update({info.cls.__name__: info.cls for info in REGISTRY.values()})

__all__ = ["Optimizer", "averaging", "get", "methods", "schedules", "__version__",
           *sorted(info.cls.__name__ for info in REGISTRY.values())]
