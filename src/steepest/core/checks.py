"""Hyperparameter checks: each raises a clear error naming the parameter and its accepted range."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

# A check raises TypeError/ValueError naming the parameter; its ``bad_example`` attribute is a value it
# rejects (the conformance suite feeds it to every optimizer).
Check = Callable[[str, Any], None]


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
        return float(value.detach().cpu())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    lo_text = "-inf" if lo is None else f"{lo:g}"
    hi_text = "inf" if hi is None else f"{hi:g}"
    return f"{left}{lo_text}, {hi_text}{right}"


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False) -> Check:
    """A finite real number in the interval [lo, hi] (ends open where asked)."""

    def check(name: str, value: Any) -> None:
        x = _as_float(name, value)
        ok = math.isfinite(x)
        if lo is not None:
            ok = ok and (x > lo if lo_open else x >= lo)
        if hi is not None:
            ok = ok and (x < hi if hi_open else x <= hi)
        if not ok:
            raise ValueError(f"{name} must lie in {_range_text(lo, hi, lo_open, hi_open)}, got {x!r}")

    check.bad_example = (lo - 1.0) if lo is not None else float("nan")
    return check


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """An integer in [lo, hi]."""

    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{name} must lie in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")

    check.bad_example = (lo - 1) if lo is not None else 0.5
    return check


def boolean(name: str, value: Any) -> None:
    """True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


boolean.bad_example = "yes"


def choice(*options: Any) -> Check:
    """One of a fixed set of values."""

    def check(name: str, value: Any) -> None:
        if value not in options:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")

    check.bad_example = "not-an-option"
    return check


def betas(n: int, lo: float = 0.0, hi: float = 1.0) -> Check:
    """A tuple of n momentum coefficients, each in [lo, hi)."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != n:
            raise ValueError(f"{name} must be a tuple of {n} numbers, each in [{lo:g}, {hi:g}), got {value!r}")
        for i, b in enumerate(value):
            real(lo, hi, hi_open=True)(f"{name}[{i}]", b)

    check.bad_example = tuple([hi + 0.5] * n)
    return check


nonnegative = real(0.0)
positive = real(0.0, lo_open=True)
unit = real(0.0, 1.0, hi_open=True)  # [0, 1)
probability = real(0.0, 1.0)  # [0, 1]
