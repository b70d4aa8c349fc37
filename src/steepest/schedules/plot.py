"""Draw learning-rate schedules to a PNG (matplotlib's Agg canvas; pyplot's global state is not touched)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _checks as C

__all__ = ["schedule_values", "plot_schedules"]


def _as_function(obj: Any) -> Callable[[int], float]:
    if hasattr(obj, "lr_multiplier"):
        return obj.lr_multiplier
    if callable(obj):
        return obj
    raise TypeError(f"cannot plot {type(obj).__name__}: pass a Schedule, a steepest scheduler, or a function "
                    f"step -> multiplier")


def schedule_values(schedule: Any, steps: int) -> np.ndarray:
    """The multipliers of ``schedule`` (a Schedule, a steepest scheduler, or ``step -> float``) at steps
    ``0 .. steps-1``, for plotting any of the schedules (papers cited on each schedule class)."""
    fn = _as_function(schedule)
    return np.array([float(fn(t)) for t in range(C.steps("steps", steps))], dtype=np.float64)


def plot_schedules(schedules: Any, path: str | os.PathLike[str], *, steps: int | None = None,
                   title: str | None = None, base_lr: float | None = None, logy: bool = False) -> str:
    """Plot one or more schedules (a Schedule / scheduler / function, a list of them, or a dict
    label -> schedule) against the step and write a PNG to ``path``; returns the path.

    ``steps`` defaults to the longest ``total`` among the schedules; ``base_lr`` turns multipliers into
    learning rates. Schedules from Loshchilov & Hutter 2017 (cosine), Hägele et al. 2024 (WSD),
    Smith & Topin 2018 (1cycle), Defazio et al. 2023 (refined) and the rest all draw the same way.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(schedules, Mapping):
        items = list(schedules.items())
    elif isinstance(schedules, Sequence) and not isinstance(schedules, str):
        items = [(_label(s), s) for s in schedules]
    else:
        items = [(_label(schedules), schedules)]
    if not items:
        raise ValueError("schedules must name at least one schedule to plot")
    if steps is None:
        totals = [_total(s) for _, s in items]
        totals = [t for t in totals if t]
        if not totals:
            raise ValueError("steps: none of the schedules has a total length; pass steps=N")
        steps = max(totals)
    steps = C.steps("steps", steps)
    scale = 1.0 if base_lr is None else C.real("base_lr", base_lr, 0.0, lo_open=True)

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(steps)
    for label, sched in items:
        ax.plot(x, scale * schedule_values(sched, steps), label=label, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate" if base_lr is not None else "LR multiplier")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path


def _label(obj: Any) -> str:
    sched = getattr(obj, "schedule", obj)
    return getattr(sched, "kind", "") or type(sched).__name__


def _total(obj: Any) -> int | None:
    total = getattr(obj, "total", None)
    if total is None:
        total = getattr(getattr(obj, "schedule", None), "total", None)
    return total if isinstance(total, int) else None
