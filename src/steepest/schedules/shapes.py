"""Learning-rate schedules as pure functions of the step: ``schedule(step) -> multiplier of the base LR``.

A :class:`Schedule` holds no state: evaluating it at any step, in any order, gives the same number, so
it can be plotted, tabulated, compared, and wrapped in a torch scheduler (:class:`~.ScheduleLR`) that
resumes exactly. Every schedule is described by a plain ``spec()`` dict (JSON-able, safe for
``torch.load(weights_only=True)``) and rebuilt by :func:`from_spec`.

Conventions (the same as Hugging Face ``transformers`` and optax): step ``t`` counts optimizer steps from
0; a linear warmup rises from ``warmup_start`` at ``t = 0`` to 1 at ``t = warmup``; a decay that ends
at ``total`` reaches its floor at ``t = total`` and holds it afterwards.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from . import _checks as C

__all__ = ["Schedule", "Constant", "Warmup", "Cosine", "LinearDecay", "InverseSqrt", "WSD", "Tabulated", "Join",
           "from_spec", "COOLDOWN_SHAPES"]


class Schedule:
    """A learning-rate multiplier as a pure function of the optimizer step (base class of the schedules of
    Goyal et al. 2017, Loshchilov & Hutter 2017, Vaswani et al. 2017, Hägele et al. 2024, Defazio et al. 2023)."""

    kind: ClassVar[str] = ""
    total: int | None = None

    def multiplier(self, step: int) -> float:
        """The multiplier of the base learning rate at ``step`` (an integer >= 0)."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.multiplier(step)

    def _args(self) -> dict[str, Any]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """A plain dict that names the schedule and its defining arguments (rebuild with :func:`from_spec`)."""
        return {"kind": self.kind, **self._args()}

    def multipliers(self, steps: int | None = None) -> np.ndarray:
        """The multipliers at steps ``0 .. steps-1`` (default: ``total``) as a float64 array."""
        n = self.total if steps is None else C.steps("steps", steps)
        if n is None:
            raise ValueError(f"steps: this {type(self).__name__} schedule has no total length; pass steps=N")
        return np.array([self.multiplier(t) for t in range(n)], dtype=np.float64)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(repr(self))


def _ramp(t: int, warmup: int, start: float) -> float:
    return start + (1.0 - start) * t / warmup


def _check_warmup(warmup: Any, total: int | None, *, strict: bool = True) -> int:
    warmup = C.steps("warmup", warmup, positive=False)
    if total is not None and (warmup >= total if strict else warmup > total):
        need = "shorter than" if strict else "at most"
        raise ValueError(f"warmup={warmup} is longer than the run allows (total={total}); warmup must be {need} "
                         f"total: pass a smaller warmup or a larger total")
    return warmup


class Constant(Schedule):
    """A constant multiplier of 1 (no schedule); common practice."""

    kind = "constant"

    def multiplier(self, step: int) -> float:
        C.step_index(step)
        return 1.0

    def _args(self) -> dict[str, Any]:
        return {}


class Warmup(Schedule):
    """Linear warmup from ``start`` to 1 over ``warmup`` steps, then constant 1 (Goyal et al. 2017,
    "Accurate, Large Minibatch SGD", arXiv 1706.02677)."""

    kind = "warmup"

    def __init__(self, *, warmup: int, start: float = 0.0, total: int | None = None) -> None:
        total = None if total is None else C.steps("total", total)
        self.warmup = C.steps("warmup", warmup)
        _check_warmup(warmup, total, strict=False)
        self.start = C.real("start", start, 0.0, 1.0)
        self.total = total

    def multiplier(self, step: int) -> float:
        t = C.step_index(step)
        return _ramp(t, self.warmup, self.start) if t < self.warmup else 1.0

    def _args(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "start": self.start, "total": self.total}


class _WarmupThenDecay(Schedule):
    """Linear warmup from ``warmup_start``, then a decay ``m = f + (1 - f) shape(p)`` from 1 to
    ``f = final_lr_ratio`` with ``p = (t - warmup) / (total - warmup)`` clipped to [0, 1]."""

    def __init__(self, *, total: int, warmup: int = 0, final_lr_ratio: float = 0.0, warmup_start: float = 0.0) -> None:
        self.total = C.steps("total", total)
        self.warmup = _check_warmup(warmup, self.total)
        self.final_lr_ratio = C.real("final_lr_ratio", final_lr_ratio, 0.0, 1.0)
        self.warmup_start = C.real("warmup_start", warmup_start, 0.0, 1.0)

    @staticmethod
    def _shape(p: float) -> float:
        raise NotImplementedError

    def multiplier(self, step: int) -> float:
        t = C.step_index(step)
        if t < self.warmup:
            return _ramp(t, self.warmup, self.warmup_start)
        p = min(1.0, (t - self.warmup) / (self.total - self.warmup))
        f = self.final_lr_ratio
        return f + (1.0 - f) * self._shape(p)

    def _args(self) -> dict[str, Any]:
        return {"total": self.total, "warmup": self.warmup, "final_lr_ratio": self.final_lr_ratio,
                "warmup_start": self.warmup_start}


class Cosine(_WarmupThenDecay):
    """Linear warmup, then cosine decay from 1 to ``final_lr_ratio`` at ``total`` (Loshchilov & Hutter 2017,
    "SGDR: Stochastic Gradient Descent with Warm Restarts", arXiv 1608.03983, without restarts).

    ``m(t) = f + (1 - f) (1 + cos(pi p)) / 2`` with ``p = (t - warmup) / (total - warmup)`` clipped to [0, 1].
    """

    kind = "cosine"

    @staticmethod
    def _shape(p: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * p))


class LinearDecay(_WarmupThenDecay):
    """Linear warmup, then linear decay from 1 to ``final_lr_ratio`` at ``total``: the worst-case optimal
    schedule of Defazio et al. 2023 ("When, Why and How Much? Adaptive Learning Rate Scheduling by
    Refinement", arXiv 2310.07831). ``m(t) = f + (1 - f)(1 - p)``, ``p`` as in :class:`Cosine`."""

    kind = "linear_decay"

    @staticmethod
    def _shape(p: float) -> float:
        return 1.0 - p


class InverseSqrt(Schedule):
    """Linear warmup, then ``m(t) = sqrt(max(warmup, 1) / t)`` (Vaswani et al. 2017, "Attention Is All You
    Need", arXiv 1706.03762), scaled to peak at 1 when warmup ends. ``total`` is optional and only bounds
    the warmup and the default plotting length."""

    kind = "inverse_sqrt"

    def __init__(self, *, warmup: int = 0, total: int | None = None, warmup_start: float = 0.0) -> None:
        self.total = None if total is None else C.steps("total", total)
        self.warmup = _check_warmup(warmup, self.total)
        self.warmup_start = C.real("warmup_start", warmup_start, 0.0, 1.0)

    def multiplier(self, step: int) -> float:
        t = C.step_index(step)
        if t < self.warmup:
            return _ramp(t, self.warmup, self.warmup_start)
        scale = max(self.warmup, 1)
        return math.sqrt(scale / max(t, scale))

    def _args(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "total": self.total, "warmup_start": self.warmup_start}


def _cooldown_linear(x: float) -> float:
    return 1.0 - x


def _cooldown_1_sqrt(x: float) -> float:
    return 1.0 - math.sqrt(x)


def _cooldown_cosine(x: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * x))


# Cooldown shapes of Hägele et al. 2024 (arXiv 2405.18392), as functions of the cooldown progress x in [0, 1].
COOLDOWN_SHAPES = {"linear": _cooldown_linear, "1-sqrt": _cooldown_1_sqrt, "cosine": _cooldown_cosine}


class WSD(Schedule):
    """Warmup-stable-decay: linear warmup, a constant 1, then a cooldown over the last ``decay`` fraction of
    the run to ``final_lr_ratio`` (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
    Fixed Training Durations", arXiv 2405.18392; Hu et al. 2024, MiniCPM).

    The cooldown lasts ``D = round(decay * total)`` steps from ``s = total - D``; with ``x = (t - s) / D``
    the shape is ``1 - x`` ("linear"), ``1 - sqrt(x)`` ("1-sqrt", the paper's best) or
    ``(1 + cos(pi x)) / 2`` ("cosine"), mapped to ``f + (1 - f) shape(x)``.
    """

    kind = "wsd"

    def __init__(self, *, total: int, warmup: int = 0, decay: float = 0.2, shape: str = "1-sqrt",
                 final_lr_ratio: float = 0.0, warmup_start: float = 0.0) -> None:
        self.total = C.steps("total", total)
        warmup = C.steps("warmup", warmup, positive=False)
        self.decay = C.real("decay", decay, 0.0, 1.0, hint=" (the fraction of total spent in the cooldown)")
        self.shape = C.choice("shape", shape, tuple(COOLDOWN_SHAPES))
        self.final_lr_ratio = C.real("final_lr_ratio", final_lr_ratio, 0.0, 1.0)
        self.warmup_start = C.real("warmup_start", warmup_start, 0.0, 1.0)
        self.decay_steps = int(math.floor(self.decay * self.total + 0.5))
        self.decay_start = self.total - self.decay_steps
        if warmup > self.decay_start:
            raise ValueError(f"warmup={warmup} is longer than the run allows: with total={self.total} and "
                             f"decay={self.decay:g} the cooldown starts at step {self.decay_start}; pass "
                             f"warmup <= {self.decay_start}, a smaller decay, or a larger total")
        self.warmup = warmup

    def multiplier(self, step: int) -> float:
        t = C.step_index(step)
        if t < self.warmup:
            return _ramp(t, self.warmup, self.warmup_start)
        if t < self.decay_start or self.decay_steps == 0:
            return 1.0
        x = min(1.0, (t - self.decay_start) / self.decay_steps)
        f = self.final_lr_ratio
        return f + (1.0 - f) * COOLDOWN_SHAPES[self.shape](x)

    def _args(self) -> dict[str, Any]:
        return {"total": self.total, "warmup": self.warmup, "decay": self.decay, "shape": self.shape,
                "final_lr_ratio": self.final_lr_ratio, "warmup_start": self.warmup_start}


class Tabulated(Schedule):
    """A schedule given as a table of multipliers, one per step, holding the last value afterwards
    (the output of :func:`~steepest.schedules.refine_schedule`, Defazio et al. 2023, arXiv 2310.07831)."""

    kind = "tabulated"

    def __init__(self, values: Sequence[float] | np.ndarray) -> None:
        arr = np.asarray(values, dtype=np.float64).reshape(-1) if not np.isscalar(values) else np.zeros(0)
        if arr.size == 0:
            raise ValueError("values must be a non-empty sequence of multipliers, one per step")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError("values must be finite and >= 0 (one learning-rate multiplier per step)")
        self.values = tuple(float(v) for v in arr)
        self.total = len(self.values)

    def multiplier(self, step: int) -> float:
        t = C.step_index(step)
        return self.values[min(t, self.total - 1)]

    def multipliers(self, steps: int | None = None) -> np.ndarray:
        if steps is None:
            return np.array(self.values)
        return super().multipliers(steps)

    def _args(self) -> dict[str, Any]:
        return {"values": list(self.values)}

    def __repr__(self) -> str:
        return f"Tabulated(<{self.total} values>)"


class Join(Schedule):
    """Schedules run one after another: ``schedules[i]`` runs from ``boundaries[i-1]`` (0 for the first),
    seeing the step counted from its own start (common practice; optax ``join_schedules``)."""

    kind = "join"

    def __init__(self, schedules: Sequence[Schedule], boundaries: Sequence[int]) -> None:
        schedules = list(schedules)
        if not schedules or not all(isinstance(s, Schedule) for s in schedules):
            raise ValueError("schedules must be a non-empty list of Schedule objects")
        bounds = [C.steps(f"boundaries[{i}]", b) for i, b in enumerate(boundaries)]
        if len(bounds) != len(schedules) - 1:
            raise ValueError(f"boundaries must hold one step fewer than schedules ({len(schedules) - 1}), "
                             f"got {len(bounds)}")
        if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
            raise ValueError(f"boundaries must increase strictly, got {bounds}")
        self.schedules = schedules
        self.boundaries = bounds
        last = schedules[-1].total
        self.total = None if last is None else (bounds[-1] if bounds else 0) + last

    def multiplier(self, step: int) -> float:
        t = C.step_index(step)
        i = bisect.bisect_right(self.boundaries, t)
        start = self.boundaries[i - 1] if i > 0 else 0
        return self.schedules[i].multiplier(t - start)

    def _args(self) -> dict[str, Any]:
        return {"schedules": [s.spec() for s in self.schedules], "boundaries": list(self.boundaries)}


_KINDS: dict[str, type[Schedule]] = {cls.kind: cls for cls in
                                     (Constant, Warmup, Cosine, LinearDecay, InverseSqrt, WSD, Tabulated, Join)}


def from_spec(spec: dict[str, Any]) -> Schedule:
    """Rebuild a :class:`Schedule` from its ``spec()`` dict (each kind cites its paper in its class)."""
    if not isinstance(spec, dict) or spec.get("kind") not in _KINDS:
        raise ValueError(f"spec must be a dict from Schedule.spec() with a known 'kind' ({', '.join(_KINDS)}), "
                         f"got {spec!r}")
    args = {k: v for k, v in spec.items() if k != "kind"}
    cls = _KINDS[spec["kind"]]
    if cls is Join:
        return Join([from_spec(s) for s in args["schedules"]], args["boundaries"])
    if cls is Tabulated:
        return Tabulated(args["values"])
    return cls(**args)
