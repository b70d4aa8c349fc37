"""Workloads of ``steepest bench``: the protocol (:class:`Workload`) and the built-in suite."""

from .base import Workload, builtin_names, get_workload

__all__ = ["Workload", "builtin_names", "get_workload"]
