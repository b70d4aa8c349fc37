"""The engine every optimizer stands on: base class, list-of-tensor ops, precision, registry."""

from .base import Optimizer
from .registry import REGISTRY, MethodInfo, get, methods, register

__all__ = ["Optimizer", "REGISTRY", "MethodInfo", "get", "methods", "register"]
