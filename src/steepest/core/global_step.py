"""The engine piece for methods whose step couples all tensors (D-Adaptation, Prodigy, DoG).

These methods estimate one step size from reductions over every tensor (inner products, norms), then
update each tensor with it. Their step is two passes with host-side scalars in between, so it cannot be
one kernel per tensor: :class:`GlobalStepOptimizer` runs it on the eager for-each path, with the base's
checks (closure, sparse gradients, skip_nonfinite), ``maximize``, float32 working copies of 16-bit
params and states, stochastic rounding and complex params (as their real view) kept exactly as the
other optimizers have them.
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import multitensor as mt
from .base import Optimizer, chunk_runs
from .precision import is_low_precision, write_back_


def growth_rate_check(name: str, value: Any) -> None:
    """A positive number; ``inf`` (no limit) allowed."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a positive number or inf, got {type(value).__name__} {value!r}")
    x = float(value)
    if not x > 0:
        raise ValueError(f"{name} must be > 0 (inf for no limit), got {x!r}")


growth_rate_check.bad_example = 0.0


def total(values: list[Tensor]) -> float:
    """The sum of 0-dim tensors as a Python float (summed in float64, one host synchronisation)."""
    if not values:
        return 0.0
    t = torch.stack([v.reshape(()) for v in values])
    if t.device.type == "mps":
        t = t.cpu()
    return float(t.double().sum())


def l1_norms(xs: list[Tensor]) -> list[Tensor]:
    return list(torch._foreach_norm(xs, 1)) if xs else []


def sq_norms(xs: list[Tensor]) -> list[Tensor]:
    return mt.squared_norms(xs) if xs else []


class Piece(NamedTuple):
    """A run of a Bucket's tensors (``p``, ``g`` and states ``s``) of a few MB in all."""

    p: list[Tensor]
    g: list[Tensor]
    s: dict[str, list[Tensor]]


class Bucket:
    """The params of one group on one device and dtype, as working tensors the update may change in place.

    ``p``, ``g`` and each ``s[name]`` are float32 copies of 16-bit tensors (the tensor itself otherwise),
    real views of complex ones, and ``g`` is negated under ``maximize``; :meth:`write_back` stores the
    working params and states home (stochastically rounded where the optimizer says so).
    """

    def __init__(self, opt: Optimizer, group: dict[str, Any], params: list[Tensor]) -> None:
        self.group = group
        self.params = params
        real = [torch.view_as_real(p) if p.is_complex() else p for p in params]
        grads = [torch.view_as_real(p.grad) if p.is_complex() else p.grad for p in params]
        self._home_p = real
        self.p = [x.float() if is_low_precision(x.dtype) else x for x in real]
        g = [x.float() if is_low_precision(x.dtype) else x for x in grads]
        self.g = mt.neg(g) if group["maximize"] else g
        names = [k for k in opt.state[params[0]] if k != "step"]
        self._home_s = {k: [self._real(opt.state[p][k]) for p in params] for k in names}
        self.s = {k: [x.float() if is_low_precision(x.dtype) else x for x in v] for k, v in self._home_s.items()}
        self._stochastic = opt.stochastic_rounding

    def pieces(self) -> list[Piece]:
        """The bucket's tensors in runs of about 2**18 elements. A pass that makes temporaries (a square root,
        a difference) goes piece by piece: temporaries as large as the model are returned to the OS after
        each step and page-faulted back in on the next, and several passes over one piece reuse the cache."""
        return [Piece([self.p[i] for i in r], [self.g[i] for i in r], {k: [v[i] for i in r] for k, v in self.s.items()})
                for r in chunk_runs([t.numel() for t in self.p])]

    @staticmethod
    def _real(t: Tensor) -> Tensor:
        return torch.view_as_real(t) if t.is_complex() else t

    def write_back(self) -> None:
        for home, work in zip(self._home_p, self.p):
            write_back_(home, work, self._stochastic)
        for k, homes in self._home_s.items():
            for home, work in zip(homes, self.s[k]):
                write_back_(home, work, self._stochastic)


class GlobalStepOptimizer(Optimizer):
    """Base of optimizers whose step reduces over all tensors to host scalars before it updates any.

    A subclass implements :meth:`global_step` over the :class:`Bucket` s of this step. It runs the eager
    for-each path only (``fusable = False``: ``compile`` is accepted and has no effect). Options named in
    ``shared_options`` are read from the first param group (as the authors' code does): every group must
    agree on them.
    """

    per_tensor = False
    elementwise = False
    fusable = False  # host-side reductions between two passes: always the eager path, whatever compile says
    weight_decay_mode = "custom"
    shared_options: tuple[str, ...] = ()

    def __init__(self, params, defaults, **engine) -> None:
        super().__init__(params, defaults, **engine)
        self._pending: list[tuple[dict[str, Any], list[Tensor]]] | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        self._pending = []
        try:
            loss = super().step(closure)  # checks, closure, skip_nonfinite; collects into _pending
            work = self._pending
        finally:
            self._pending = None
        if work:
            self._check_shared()
            self.global_step(work)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        self._pending.append((group, params))

    def _check_shared(self) -> None:
        first = self.param_groups[0]
        for gi, group in enumerate(self.param_groups[1:], start=1):
            for key in self.shared_options:
                if group[key] != first[key]:
                    raise ValueError(f"{type(self).__name__}: {key} is shared by all param groups (the step size "
                                     f"is estimated jointly); param group {gi} has {group[key]!r}, group 0 "
                                     f"{first[key]!r}")

    def shared_lr(self) -> float:
        """The one learning rate of all groups (groups may also hold lr=0, which freezes them)."""
        lrs = [self.lr(g) for g in self.param_groups]
        lr = max(lrs)
        for gi, x in enumerate(lrs):
            if x not in (lr, 0.0):
                raise ValueError(f"{type(self).__name__}: param group {gi} has lr {x!r} but another has {lr!r}; "
                                 f"the adapted step size is global, so groups share one lr (or lr=0 to freeze a "
                                 f"group), as in the authors' code")
        return lr

    def buckets(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> list[Bucket]:
        """State initialised where missing, then the working tensors, by group, device and dtype."""
        out = []
        for group, params in work:
            split: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(self.init_state(p, group))
                    state["step"] = 0
                split[(p.device, p.dtype, p.grad.dtype)].append(p)
            out.extend(Bucket(self, group, ps) for ps in split.values())
        return out

    def count_step(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            for p in b.params:
                self.state[p]["step"] += 1

    def copy_state(self, p: Tensor) -> Tensor:
        """A copy of p in the state dtype (an initial point kept for distances)."""
        return torch.empty_like(p, dtype=self.state_dtype_for(p), memory_format=torch.preserve_format).copy_(p)

    def global_step(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        raise NotImplementedError

