"""steepest: optimizers from the literature, instruments to look inside training, and an honest benchmark."""

from .core.base import Optimizer
from .core.registry import get, methods
from .optim import *  # noqa: F403 - every optimizer is importable as steepest.Name
from .optim import __all__ as _optim_all

__version__ = "0.1.0"
__all__ = ["Optimizer", "get", "methods", "__version__", *_optim_all]
