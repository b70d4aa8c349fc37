"""Torch LR schedulers over the pure schedules in :mod:`.shapes`, and the 1cycle policy.

Each scheduler is a :class:`torch.optim.lr_scheduler.LRScheduler`: it works with any torch optimizer, with
``SequentialLR`` / ``ChainedScheduler``, and round-trips through ``state_dict``. Loading a state saved by
a schedule of a different shape or length raises a ValueError naming the argument that changed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from . import _checks as C
from .refine import refine_schedule
from .shapes import WSD, Constant, Cosine, InverseSqrt, LinearDecay, Schedule, Tabulated, Warmup

__all__ = ["ScheduleLR", "OneCycle", "one_cycle_lr", "from_schedule", "constant", "linear_warmup", "cosine",
           "linear_decay", "inverse_sqrt", "wsd", "one_cycle", "refined"]


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


def _first_difference(saved: Any, mine: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(saved, dict) and isinstance(mine, dict):
        for key in list(mine) + [k for k in saved if k not in mine]:
            sub = f"{path}.{key}" if path else key
            if key not in saved or key not in mine:
                return sub, saved.get(key, "<absent>"), mine.get(key, "<absent>")
            found = _first_difference(saved[key], mine[key], sub)
            if found:
                return found
        return None
    if isinstance(saved, (list, tuple)) and isinstance(mine, (list, tuple)):
        if len(saved) != len(mine):
            return path, f"<{len(saved)} entries>", f"<{len(mine)} entries>"
        for i, (a, b) in enumerate(zip(saved, mine)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if saved == mine else (path, saved, mine)


def _check_resume(saved: Any, mine: dict[str, Any], owner: str) -> None:
    if saved is None:
        return
    found = _first_difference(saved, mine, "")
    if found is None:
        return
    name, old, new = found
    if name == "kind":
        raise ValueError(f"schedule: the checkpoint holds a {old!r} schedule but this {owner} runs a {new!r} "
                         f"schedule; build the same kind of schedule to resume, or start a fresh one without "
                         f"load_state_dict")
    if isinstance(old, str) and old.startswith("<"):
        old_t, new_t = old, new
    else:
        old_t, new_t = repr(old), repr(new)
    raise ValueError(f"{name}: the checkpoint was saved with {name}={old_t} but this {owner} has {name}={new_t}; "
                     f"resuming with a changed {name} would jump the learning rate mid-run. Construct the "
                     f"scheduler with {name}={old_t} to resume, or start a new schedule without load_state_dict")


class ScheduleLR(LRScheduler):
    """A torch LR scheduler that sets ``lr = base_lr * schedule(step)`` for every param group (the
    ``LambdaLR`` pattern of torch; schedules from Loshchilov & Hutter 2017, Hägele et al. 2024, Defazio et al.
    2023 and the rest all run through it).

    ``schedule`` is any :class:`~steepest.schedules.Schedule` (or a composition of them); ``step`` is the
    scheduler's ``last_epoch``, i.e. the number of ``scheduler.step()`` calls. Call ``scheduler.step()``
    after each ``optimizer.step()``, as for every torch scheduler.
    """

    def __init__(self, optimizer: Optimizer, schedule: Schedule, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a steepest.schedules.Schedule, got {type(schedule).__name__}; "
                            f"wrap a table of multipliers in Tabulated(values)")
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        """The learning rates at the current step, one per param group."""
        m = self.schedule.multiplier(max(self.last_epoch, 0))
        return [base * m for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def lr_multiplier(self, step: int) -> float:
        """The multiplier of the base LR at ``step`` (pure: does not move the scheduler)."""
        return self.schedule.multiplier(step)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler state; the schedule is stored as its plain ``spec()`` dict."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}
        state["schedule"] = self.schedule.spec()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; raises ValueError, changing nothing, if the saved schedule
        differs (in kind or in any argument such as ``total``) from this scheduler's."""
        _check_resume(state_dict.get("schedule"), self.schedule.spec(), "scheduler")
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "schedule"})


def from_schedule(optimizer: Optimizer, schedule: Schedule) -> ScheduleLR:
    """Wrap any pure :class:`Schedule` (e.g. a :class:`Join` of several, or the refined schedule of Defazio
    et al. 2023, arXiv 2310.07831) in a torch scheduler."""
    return ScheduleLR(optimizer, schedule)


def constant(optimizer: Optimizer) -> ScheduleLR:
    """A constant learning rate (common practice)."""
    _check_optimizer(optimizer)
    return ScheduleLR(optimizer, Constant())


def linear_warmup(optimizer: Optimizer, *, warmup: int, start: float = 0.0, total: int | None = None) -> ScheduleLR:
    """Linear warmup over ``warmup`` steps, then constant (Goyal et al. 2017, arXiv 1706.02677)."""
    _check_optimizer(optimizer)
    return ScheduleLR(optimizer, Warmup(warmup=warmup, start=start, total=total))


def cosine(optimizer: Optimizer, *, total: int, warmup: int = 0, final_lr_ratio: float = 0.0,
           warmup_start: float = 0.0) -> ScheduleLR:
    """Linear warmup then cosine decay to ``final_lr_ratio * lr`` at ``total`` (Loshchilov & Hutter 2017,
    arXiv 1608.03983)."""
    _check_optimizer(optimizer)
    return ScheduleLR(optimizer, Cosine(total=total, warmup=warmup, final_lr_ratio=final_lr_ratio,
                                        warmup_start=warmup_start))


def linear_decay(optimizer: Optimizer, *, total: int, warmup: int = 0, final_lr_ratio: float = 0.0,
                 warmup_start: float = 0.0) -> ScheduleLR:
    """Linear warmup then linear decay to ``final_lr_ratio * lr`` at ``total`` (Defazio et al. 2023,
    arXiv 2310.07831: the worst-case optimal schedule)."""
    _check_optimizer(optimizer)
    return ScheduleLR(optimizer, LinearDecay(total=total, warmup=warmup, final_lr_ratio=final_lr_ratio,
                                             warmup_start=warmup_start))


def inverse_sqrt(optimizer: Optimizer, *, warmup: int = 0, total: int | None = None,
                 warmup_start: float = 0.0) -> ScheduleLR:
    """Linear warmup then ``lr * sqrt(warmup / t)`` (Vaswani et al. 2017, arXiv 1706.03762)."""
    _check_optimizer(optimizer)
    return ScheduleLR(optimizer, InverseSqrt(warmup=warmup, total=total, warmup_start=warmup_start))


def wsd(optimizer: Optimizer, *, total: int, warmup: int = 0, decay: float = 0.2, shape: str = "1-sqrt",
        final_lr_ratio: float = 0.0, warmup_start: float = 0.0) -> ScheduleLR:
    """Warmup-stable-decay with the cooldown shapes "linear", "1-sqrt", "cosine" over the last ``decay``
    fraction of the run (Hägele et al. 2024, arXiv 2405.18392)."""
    _check_optimizer(optimizer)
    return ScheduleLR(optimizer, WSD(total=total, warmup=warmup, decay=decay, shape=shape,
                                     final_lr_ratio=final_lr_ratio, warmup_start=warmup_start))


def refined(optimizer: Optimizer, grad_norms: Any, *, tau: float = 0.1, power: float = 2.0,
            total: int | None = None) -> ScheduleLR:
    """The schedule refined from a previous run's gradient norms (Defazio et al. 2023, arXiv 2310.07831);
    see :func:`~steepest.schedules.refine_schedule`."""
    _check_optimizer(optimizer)
    sched: Tabulated = refine_schedule(grad_norms, tau=tau, power=power, total=total)
    return ScheduleLR(optimizer, sched)


# ----------------------------------------------------------------------------------------------- 1cycle


def _anneal(kind: str, start: float, end: float, pct: float) -> float:
    if kind == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def _one_cycle_phases(total: int, pct_start: float, three_phase: bool) -> list[float]:
    if three_phase:
        return [float(pct_start * total) - 1, float(2 * pct_start * total) - 2, total - 1]
    return [float(pct_start * total) - 1, total - 1]


def _one_cycle_value(step: int, ends: list[float], values: list[float], kind: str) -> float:
    start = 0.0
    for i, end in enumerate(ends):
        if step <= end or i == len(ends) - 1:
            return _anneal(kind, values[i], values[i + 1], (step - start) / (end - start))
        start = end
    raise AssertionError("unreachable")


def _check_one_cycle(total: Any, pct_start: Any, anneal_strategy: Any, div_factor: Any, final_div_factor: Any,
                     three_phase: Any) -> tuple[int, float, str, float, float, bool]:
    total = C.steps("total", total, hint=" (the number of optimizer steps in the cycle)")
    pct_start = C.real("pct_start", pct_start, 0.0, 1.0, lo_open=True, hi_open=True)
    anneal_strategy = C.choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
    div_factor = C.real("div_factor", div_factor, 0.0, lo_open=True)
    final_div_factor = C.real("final_div_factor", final_div_factor, 0.0, lo_open=True)
    ends = _one_cycle_phases(total, pct_start, bool(three_phase))
    if ends[0] <= 0 or any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"pct_start={pct_start:g} leaves an empty phase in a cycle of total={total} steps; "
                         f"pass pct_start with pct_start*total > 1 and (three_phase: 2*pct_start < 1 + 1/total) "
                         f"or a larger total")
    return total, pct_start, anneal_strategy, div_factor, final_div_factor, bool(three_phase)


def one_cycle_lr(step: int, *, total: int, max_lr: float, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False) -> float:
    """The 1cycle learning rate at ``step`` (Smith & Topin 2018, "Super-Convergence", arXiv 1708.07120;
    Smith 2018, arXiv 1803.09820): from ``max_lr / div_factor`` up to ``max_lr`` over ``pct_start`` of the
    run, then down to ``max_lr / (div_factor * final_div_factor)``; the same numbers as
    ``torch.optim.lr_scheduler.OneCycleLR``. Past ``total`` the value at ``total`` is held."""
    total, pct_start, kind, div, fdiv, three = _check_one_cycle(total, pct_start, anneal_strategy, div_factor,
                                                                 final_div_factor, three_phase)
    max_lr = C.real("max_lr", max_lr, 0.0)
    t = min(C.step_index(step), total)
    initial = max_lr / div
    values = [initial, max_lr, initial, initial / fdiv] if three else [initial, max_lr, initial / fdiv]
    return _one_cycle_value(t, _one_cycle_phases(total, pct_start, three), values, kind)


class OneCycle(LRScheduler):
    """The 1cycle policy (Smith & Topin 2018, "Super-Convergence: Very Fast Training of Neural Networks Using
    Large Learning Rates", arXiv 1708.07120; Smith 2018, arXiv 1803.09820), with momentum cycled inversely
    (``momentum`` for SGD-like optimizers, ``betas[0]`` for Adam-like ones).

    Same arguments, defaults and learning rates as ``torch.optim.lr_scheduler.OneCycleLR`` (``total`` is its
    ``total_steps``); ``max_lr=None`` takes each group's current ``lr`` as its peak. Differences: past
    ``total`` steps the last value is held where torch raises, and bad arguments raise before anything in
    the optimizer changes.
    """

    def __init__(self, optimizer: Optimizer, *, total: int, max_lr: float | list[float] | None = None,
                 pct_start: float = 0.3, anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float | list[float] = 0.85, max_momentum: float | list[float] = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False,
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        (self.total, self.pct_start, self.anneal_strategy, self.div_factor, self.final_div_factor,
         self.three_phase) = _check_one_cycle(total, pct_start, anneal_strategy, div_factor, final_div_factor,
                                              three_phase)
        groups = optimizer.param_groups
        max_lrs = self._per_group("max_lr", [g["lr"] for g in groups] if max_lr is None else max_lr, groups)
        self.cycle_momentum = bool(cycle_momentum)
        self.use_beta1 = "betas" in optimizer.defaults
        if self.cycle_momentum:
            if "momentum" not in optimizer.defaults and not self.use_beta1:
                raise ValueError(f"cycle_momentum: {type(optimizer).__name__} has neither 'momentum' nor 'betas'; "
                                 f"pass cycle_momentum=False")
            max_moms = self._per_group("max_momentum", max_momentum, groups)
            base_moms = self._per_group("base_momentum", base_momentum, groups)
        self.max_lrs = max_lrs
        self.initial_lrs = [m / self.div_factor for m in max_lrs]
        self.min_lrs = [i / self.final_div_factor for i in self.initial_lrs]
        self._ends = _one_cycle_phases(self.total, self.pct_start, self.three_phase)
        if last_epoch == -1:
            for group, init in zip(groups, self.initial_lrs):
                group["initial_lr"] = init
        if self.cycle_momentum:
            self.max_momentums, self.base_momentums = max_moms, base_moms
            if last_epoch == -1:
                for group, m in zip(groups, max_moms):
                    if self.use_beta1:
                        group["betas"] = (m, *group["betas"][1:])
                    else:
                        group["momentum"] = m
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _per_group(name: str, value: Any, groups: list[dict[str, Any]]) -> list[float]:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(groups)
        if len(values) != len(groups):
            raise ValueError(f"{name} must be one number or one per param group ({len(groups)}), got {len(values)}")
        out = []
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                v = float(v)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}[{i}] must be a finite number >= 0, got {v!r}")
            out.append(float(v))
        return out

    def _values(self, i: int, lr: bool) -> list[float]:
        if lr:
            init, peak, low = self.initial_lrs[i], self.max_lrs[i], self.min_lrs[i]
            return [init, peak, init, low] if self.three_phase else [init, peak, low]
        hi, lo = self.max_momentums[i], self.base_momentums[i]
        return [hi, lo, hi, hi] if self.three_phase else [hi, lo, hi]

    def get_lr(self) -> list[float]:
        """The learning rates at the current step; also sets the cycled momentum."""
        t = min(max(self.last_epoch, 0), self.total)
        lrs = []
        for i, group in enumerate(self.optimizer.param_groups):
            lrs.append(_one_cycle_value(t, self._ends, self._values(i, True), self.anneal_strategy))
            if self.cycle_momentum:
                m = _one_cycle_value(t, self._ends, self._values(i, False), self.anneal_strategy)
                if self.use_beta1:
                    group["betas"] = (m, *group["betas"][1:])
                else:
                    group["momentum"] = m
        return lrs

    def lr_multiplier(self, step: int) -> float:
        """The LR of the first group at ``step`` divided by its ``max_lr`` (pure)."""
        t = min(C.step_index(step), self.total)
        peak = self.max_lrs[0]
        return _one_cycle_value(t, self._ends, self._values(0, True), self.anneal_strategy) / peak if peak else 0.0

    def _spec(self) -> dict[str, Any]:
        return {"kind": "one_cycle", "total": self.total, "pct_start": self.pct_start,
                "anneal_strategy": self.anneal_strategy, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor, "three_phase": self.three_phase}

    def state_dict(self) -> dict[str, Any]:
        """The scheduler state (with a ``schedule`` spec checked on load)."""
        state = {k: v for k, v in self.__dict__.items() if k != "optimizer"}
        state["schedule"] = self._spec()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state; raises ValueError, changing nothing, if the saved cycle had other arguments."""
        _check_resume(state_dict.get("schedule"), self._spec(), "scheduler")
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "schedule"})


def one_cycle(optimizer: Optimizer, *, total: int, max_lr: float | list[float] | None = None,
              **kwargs: Any) -> OneCycle:
    """The 1cycle policy (Smith & Topin 2018, arXiv 1708.07120); see :class:`OneCycle`."""
    return OneCycle(optimizer, total=total, max_lr=max_lr, **kwargs)
