"""Argument checks shared by the schedules: each raises a ValueError naming the argument and the fix."""

from __future__ import annotations

import math
import numbers
from typing import Any


def steps(name: str, value: Any, *, positive: bool = True, hint: str = "") -> int:
    """An integer step count: > 0 when ``positive``, else >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer number of optimizer steps, got {value!r}{hint}")
    value = int(value)
    if positive and value <= 0:
        raise ValueError(f"{name} must be a positive number of optimizer steps, got {value}{hint}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0 optimizer steps, got {value}{hint}")
    return value


def real(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False, hint: str = "") -> float:
    """A finite real number in [lo, hi] (ends open where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}{hint}")
    x = float(value)
    ok = math.isfinite(x)
    if lo is not None:
        ok = ok and (x > lo if lo_open else x >= lo)
    if hi is not None:
        ok = ok and (x < hi if hi_open else x <= hi)
    if not ok:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        lo_t = "-inf" if lo is None else f"{lo:g}"
        hi_t = "inf" if hi is None else f"{hi:g}"
        raise ValueError(f"{name} must lie in {left}{lo_t}, {hi_t}{right}, got {value!r}{hint}")
    return x


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    """One of a few strings."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def step_index(step: Any) -> int:
    """A step at which to evaluate a schedule (an integer >= 0)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        if isinstance(step, float) and step.is_integer():
            return step_index(int(step))
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step}")
    return int(step)
