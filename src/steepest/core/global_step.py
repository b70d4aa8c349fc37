"""The engine piece for methods whose step couples all tensors (D-Adaptation, Prodigy, DoG).

These methods estimate one step size from reductions over every tensor (inner products, norms), then
update each tensor with it: passes over the tensors with host-side scalars in between, so the step cannot
be one kernel per tensor. :class:`GlobalStepOptimizer` keeps the base's checks (closure, sparse gradients,
skip_nonfinite), ``maximize``, float32 working copies of 16-bit params and states, stochastic rounding and
complex params (as their real view) exactly as the other optimizers have them. A method written as passes
(:meth:`GlobalStepOptimizer.run_pass`: pure functions over lists of tensors that return per-tensor
reductions) runs each pass eager (for-each, piece by piece) or compiled (one kernel per tensor per pass, the
reductions returned by the kernel), as ``compile`` says; the others run the eager path only.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import checks
from . import multitensor as mt
from .base import Optimizer, _apply_update, chunk_runs, flat_pieces
from .precision import as_real, working_copy, write_back_


def growth_rate_check(name: str, value: Any) -> None:
    """A positive number; ``inf`` (no limit) allowed."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a positive number or inf, got {type(value).__name__} {value!r}")
    x = float(value)
    if not x > 0:
        raise ValueError(f"{name} must be > 0 (inf for no limit), got {x!r}")


growth_rate_check.bad_example = 0.0


def total(values: list[Tensor]) -> float:
    """The sum of 0-dim tensors as a Python float: on the CPU, their values summed exactly rounded (``math.fsum``;
    ~7 us for 40 values, against ~70 us for stacking them into one tensor first); elsewhere summed in float64 on
    the device, one host synchronisation."""
    if not values:
        return 0.0
    if not all(mt.plain(v) for v in values):
        # DTensor reductions are partial sums over each process's shard (their .item() is this process's share):
        # one all-reduce of the stacked values makes them the whole tensors'.
        return float(torch.stack([v.reshape(()) for v in values]).full_tensor().double().sum())
    if all(v.device.type == "cpu" for v in values):
        return math.fsum(v.item() for v in values)
    t = torch.stack([v.reshape(()) for v in values])
    if t.device.type == "mps":
        t = t.cpu()
    return float(t.double().sum())


class Part(NamedTuple):
    """The params of one group on one device and dtype with their gradients and states, as a pass takes them
    (real views of complex tensors); ``params`` are the Parameters themselves (the state's keys)."""

    group: dict[str, Any]
    params: list[Tensor]
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
        self._home_p = [as_real(p) for p in params]
        self.p = [working_copy(x) for x in self._home_p]
        g = [working_copy(as_real(p.grad)) for p in params]
        self.g = mt.neg(g) if group["maximize"] else g
        names = opt.state_names(opt.state[params[0]], group)
        self._home_s = {k: [as_real(opt.state[p][k]) for p in params] for k in names}
        self.s = {k: [working_copy(x) for x in v] for k, v in self._home_s.items()}
        self._stochastic = opt.stochastic_rounding

    def write_back(self) -> None:
        for home, work in zip(self._home_p, self.p):
            write_back_(home, work, self._stochastic)
        for k, homes in self._home_s.items():
            for home, work in zip(homes, self.s[k]):
                write_back_(home, work, self._stochastic)


class GlobalStepOptimizer(Optimizer):
    """Base of optimizers whose step reduces over all tensors to host scalars before it updates any.

    A subclass implements :meth:`global_step` over this step's tensors: as passes over :meth:`parts` with
    :meth:`run_pass` (``fusable = True``: each pass runs eager or compiled, as ``compile`` says), or over
    :class:`Bucket` s, eager only (``fusable = False``: ``compile`` is accepted and has no effect). Options named
    in ``shared_options`` are read from the first param group (as the authors' code does): every group must
    agree on them.
    """

    per_tensor = False
    elementwise = False
    # Methods that write their step with run_pass set True: each pass then compiles (a few tensors per kernel call,
    # their reductions returned); the others run the eager path whatever compile says.
    fusable = False
    weight_decay_mode = "custom"
    shared_options: tuple[str, ...] = ()
    # Methods whose global numbers are sums over the model's entries, totalled through :meth:`global_sum`: they
    # take ``fsdp_in_use`` (params sharded over processes).
    shardable = False

    def __init__(self, params, defaults, *, fsdp_in_use: bool = False, **engine) -> None:
        name = type(self).__name__
        checks.boolean("fsdp_in_use", fsdp_in_use)
        if fsdp_in_use and not self.shardable:
            raise TypeError(f"{name}: fsdp_in_use=True is not supported (its step is not a sum over the model's "
                            f"entries that an all-reduce could complete); leave it out")
        self.fsdp_in_use = fsdp_in_use
        super().__init__(params, defaults, **engine)
        self._pending: list[tuple[dict[str, Any], list[Tensor]]] | None = None

    @classmethod
    def takes_dtensor_params(cls) -> bool:
        """The base's, and the methods whose global numbers are sums (``shardable``): totalled through
        :func:`total`, a DTensor's partial sums become the whole tensors'."""
        return cls.shardable or super().takes_dtensor_params()

    def engine_options(self) -> dict[str, Any]:
        """The base's, and ``fsdp_in_use``."""
        return {**super().engine_options(), "fsdp_in_use": getattr(self, "fsdp_in_use", False)}

    def sharded(self) -> bool:
        """Whether the params are shards of a model spread over processes: ``fsdp_in_use=True``, or a param flattened
        by torch's FullyShardedDataParallel (``_fsdp_flattened``), as the authors' packages detect it."""
        return getattr(self, "fsdp_in_use", False) or (self.shardable and any(
            getattr(p, "_fsdp_flattened", False) for group in self.param_groups for p in group["params"]))

    def _sharded_now(self) -> bool:
        flag = getattr(self, "_step_sharded", None)
        return self.sharded() if flag is None else flag

    def global_sum(self, values: list[float]) -> list[float]:
        """``values`` (this process's sums over its params) summed over every process of the default group when the
        params are sharded (one all-reduce, float64, on the params' device), else as they are.

        Every process must call it as often, in the same order: each must hold params with gradients (an empty
        shard skips the step, and the others wait for it)."""
        if not self._sharded_now():
            return list(values)
        import torch.distributed as dist

        device = self.param_groups[0]["params"][0].device
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def _collect(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        work = super()._collect()
        if work and self.fsdp_in_use and not all(mt.plain(p) for _, params in work for p in params):
            raise TypeError(f"{type(self).__name__}: fsdp_in_use=True with DTensor params (FSDP2) would count every "
                            f"sum once per process: their sums are the whole tensors' already; leave it out")
        # Decided once a step (a look at every param): global_sum and _grads_finite read it.
        self._step_sharded = bool(work) and self.sharded()
        if self._step_sharded:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"{type(self).__name__}: fsdp_in_use (params sharded over processes) needs "
                                   f"torch.distributed initialised (init_process_group) before the step")
        return work

    def _grads_finite(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
        # Sharded, every process skips or none does (one that skipped would leave the others in an all-reduce).
        local = Optimizer._grads_finite(work)
        if not self._sharded_now():
            return local
        return self.global_sum([0.0 if local else 1.0])[0] == 0.0

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

    def _split(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """State initialised where missing, then the params by group, device and dtype."""
        out = []
        for group, params in work:
            split: dict[tuple, list[Tensor]] = defaultdict(list)
            in_use = self.optional_in_use(group)
            for p in params:
                self._state_of(p, group, in_use)
                split[(p.device, p.dtype, p.grad.dtype)].append(p)
            out.extend((group, ps) for ps in split.values())
        return out

    def buckets(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> list[Bucket]:
        """State initialised where missing, then the working tensors, by group, device and dtype."""
        return [Bucket(self, group, ps) for group, ps in self._split(work)]

    @classmethod
    def _flattenable(cls) -> bool:
        return cls.fusable

    def parts(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> list[Part]:
        """State initialised where missing, then the tensors by group, device and dtype, for :meth:`run_pass`."""
        out = []
        for group, ps in self._split(work):
            names = self.state_names(self.state[ps[0]], group)
            out.append(Part(group, ps, [as_real(p) for p in ps], [as_real(p.grad) for p in ps],
                            {k: [as_real(self.state[p][k]) for p in ps] for k in names}))
        return out

    def run_pass(self, part: Part, fn: Callable[..., dict[str, list[Tensor]] | None], scalars: dict[str, float],
                 *, fuse: bool = True, reverse: bool = False,
                 **static: Any) -> dict[str, list[Tensor]]:
        """One pass ``fn(p, g, **states, **scalars, **static)`` over a part's tensors, with ``maximize``, float32
        working copies and write-back as every update has them; returns fn's per-tensor reductions (a dict of
        lists of 0-dim tensors, in the part's order).

        fn is written with :mod:`~steepest.core.multitensor` helpers, as an update is, and its reductions are sums
        over each tensor's elements: it runs eager over runs of about 2**18 elements, a large tensor cut into flat
        pieces whose sums are added (few-MB temporaries, reused from cache; see
        :func:`~steepest.core.base.flat_pieces`), or, as ``compile`` says, compiled with scalars passed as tensors
        (changing them never recompiles), a few tensors per kernel call: no loop of a pass waits on the pass's own
        reductions (the step size they give is the next pass's), so a call's loops need not run tensor by tensor
        (against one tensor per call: 300 tensors of 2000 floats, DoG 0.86 of the step time, D-Adaptation Adam 0.86,
        Prodigy 0.92; 16.8M floats in 14, 24 or 40 tensors, 0.98-1.01). ``fuse=False`` runs it
        eager whatever ``compile`` says (a pass that runs once, at a first step, is not worth a compile there).
        ``reverse`` takes the tensors from last to first: a pass after one that read the whole model then starts on
        the tensors still in the last-level cache (DoG, ALR-SMAG, Prodigy, compiled and eager: 0.95-0.98 of the
        step time with both passes forward, in back-to-back steps as benchmarks/step_speed.py times them, where the
        next step's first pass also starts on tensors the reversed pass left in the cache).
        """
        options = dict(static=static, maximize=bool(part.group["maximize"]), wd_mode=None,
                       stochastic=self.rounds_stochastically(part.p, part.s))
        outputs: dict[str, dict[int, Tensor]] = defaultdict(dict)
        todo = list(range(len(part.p)))
        if fuse and self._wants_compile(part.p):
            plan = self._fused_plan(part.group, part.p, part.g, part.s, elementwise=True)
            if plan.order:
                done = set(self._run_fused(part.p, part.g, part.s, scalars, 0.0, plan, part.p[0].device, options,
                                           update=fn, outputs=outputs, reverse=reverse))
                todo = [i for i in todo if i not in done]
        runs = chunk_runs([part.p[i].numel() for i in todo])
        for run in reversed(runs) if reverse else runs:
            idx = [todo[j] for j in run]
            args = ([part.p[i] for i in idx], [part.g[i] for i in idx],
                    {k: [v[i] for i in idx] for k, v in part.s.items()})
            pieces = flat_pieces(*args)
            if pieces is None:
                result = _apply_update(fn, *args, scalars, 0.0, **options)
            else:
                # One large tensor in pieces (its temporaries stay small): the pieces' sums add up to the tensor's.
                results = [_apply_update(fn, *piece, scalars, 0.0, **options) or {}
                           for piece in (reversed(pieces) if reverse else pieces)]
                result = {name: [sum(r[name][0] for r in results)] for name in results[0]}
            for name, values in (result or {}).items():
                outputs[name].update(zip(idx, values))
        return {name: [values[i] for i in range(len(part.p))] for name, values in outputs.items()}

    def count_step(self, buckets: list[Bucket] | list[Part]) -> None:
        for b in buckets:
            for p in b.params:
                self.state[p]["step"] += 1

    def global_step(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        raise NotImplementedError

