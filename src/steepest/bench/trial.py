"""One benchmark trial: train a workload with one optimizer at one hyperparameter point and one seed.

Every trial uses 5% linear warmup then cosine decay to zero, as AlgoPerf's baselines (Dahl et al. 2023,
arXiv 2306.07179), and records time-to-target in optimizer steps (the primary, machine-independent time
axis) beside wall-clock seconds and ms/step.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .space import OptimizerSpec
from .workloads.base import get_workload

WARMUP_FRACTION = 0.05


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = WARMUP_FRACTION):
    """A torch LambdaLR: linear warmup over ``warmup_fraction`` of ``total_steps``, then cosine decay to 0.

    The schedule of AlgoPerf's NAdamW / momentum baselines (Dahl et al. 2023, arXiv 2306.07179).
    """
    if total_steps < 1:
        raise ValueError(f"warmup_cosine: total_steps must be >= 1, got {total_steps}")
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:  # step = number of scheduler.step() calls so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def package_version() -> str:
    """The installed steepest version (part of every trial's content hash)."""
    from .. import __version__
    return __version__


def trial_key(workload: str, workload_version: int, optimizer: str, hparams: dict, seed: int, budget: int,
              target: float | None) -> str:
    """Content hash of a trial: workload (name, version, budget, target), optimizer, hyperparameters, seed and
    package version. Identical keys mean identical work, so a store never runs a trial twice."""
    blob = json.dumps({"workload": workload, "workload_version": workload_version, "optimizer": optimizer,
                       "hparams": {k: hparams[k] for k in sorted(hparams)}, "seed": int(seed),
                       "budget": int(budget), "target": target, "package": package_version()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class TrialResult:
    """The record of one trial. ``log`` rows are (step, train seconds, mean train loss since last row, metric)."""

    key: str
    workload: str
    workload_version: int
    optimizer: str
    hparams: dict[str, float]
    seed: int
    budget: int
    target: float | None
    reached: bool
    steps_to_target: int | None
    seconds_to_target: float | None
    best_metric: float
    final_metric: float
    diverged: bool
    ms_per_step: float
    wall_s: float
    state_bytes_per_param: float
    log: list[list[float]] = field(default_factory=list)
    package_version: str = ""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the record."""
        return asdict(self)


@contextmanager
def one_thread():
    """Run torch on one thread (deterministic and fair on a shared machine), restoring the old setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.numel() > 1:
                total += v.numel() * v.element_size()
    return total


def run_trial(workload: str | Any, optimizer: str | OptimizerSpec, hparams: dict[str, float], seed: int,
              budget: int | None = None) -> TrialResult:
    """Train ``workload`` with ``optimizer`` at ``hparams`` for its step budget; return the trial record.

    A non-finite training loss or metric marks the trial diverged and stops it (recorded, not raised).
    Runs on one torch thread (deterministic, and fair on a shared machine).
    """
    with one_thread():
        return _run_trial(workload, optimizer, hparams, seed, budget)


def _run_trial(workload, optimizer, hparams, seed, budget) -> TrialResult:
    w = get_workload(workload) if isinstance(workload, str) else workload
    opt_spec = OptimizerSpec(optimizer) if isinstance(optimizer, str) else optimizer
    budget = int(budget or w.budget)
    key = trial_key(w.name, w.version, opt_spec.name, hparams, seed, budget, w.target)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = w.build(seed)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(seed + 7919)
    needs = opt_spec.needs
    opt = opt_spec.build(model if "model" in needs else [p for p in model.parameters() if p.requires_grad], hparams)
    sched = warmup_cosine(opt, budget)
    log: list[list[float]] = []
    best = math.nan
    metric = math.nan
    steps_to_target = seconds_to_target = None
    diverged = False
    train_s = 0.0
    loss_sum, loss_n = 0.0, 0
    error = ""
    for step in range(1, budget + 1):
        t0 = time.perf_counter()
        model.train()
        batch = w.batch(gen)
        if "closure" in needs:
            def closure(batch=batch):
                opt.zero_grad(set_to_none=True)
                value = w.loss(model, batch)
                # Methods that refresh their Hessian estimate every k steps need the graph only then.
                due = getattr(opt, "create_graph_due", None)
                value.backward(create_graph="hvp" in needs and (due is None or due()))
                return value

            loss = opt.step(closure)
        else:
            loss = w.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        lv = float(loss.detach())
        if not math.isfinite(lv):
            diverged, error = True, f"non-finite training loss at step {step}"
            break
        loss_sum, loss_n = loss_sum + lv, loss_n + 1
        if step % w.eval_every == 0 or step == budget:
            model.eval()
            with torch.no_grad():
                metric = float(w.evaluate(model))
            log.append([step, round(train_s, 6), loss_sum / loss_n, metric])
            loss_sum, loss_n = 0.0, 0
            if not math.isfinite(metric):
                diverged, error = True, f"non-finite validation metric at step {step}"
                break
            if w.better(metric, best):
                best = metric
            if steps_to_target is None and w.reached(metric):
                steps_to_target, seconds_to_target = step, train_s
    state = _state_bytes(opt) / max(1, n_params)
    done_steps = int(log[-1][0]) if log else 0
    return TrialResult(key=key, workload=w.name, workload_version=int(w.version), optimizer=opt_spec.name,
                       hparams=dict(hparams), seed=int(seed), budget=budget, target=w.target,
                       reached=steps_to_target is not None, steps_to_target=steps_to_target,
                       seconds_to_target=seconds_to_target, best_metric=best,
                       final_metric=math.nan if diverged else metric, diverged=diverged,
                       ms_per_step=1e3 * train_s / max(1, step if diverged else budget),
                       wall_s=time.perf_counter() - start, state_bytes_per_param=state, log=log,
                       package_version=package_version(), error=error or ("" if done_steps else "no evaluation"))
