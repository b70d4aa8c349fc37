"""Planning and running a benchmark suite: studies of Halton trials per (workload, optimizer), in a process pool.

The protocol is AlgoPerf's external tuning (Dahl et al. 2023, arXiv 2306.07179, Sec. 4.4): K studies, each
of N quasi-random trials, per workload and optimizer. Finished trials live in a :class:`Store`; a re-run
computes the same plan, skips what is stored and runs the rest, so a killed run resumes with the same
results. Trials run one torch thread each in a local process pool sized to the cores (``--jobs``).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass, field

from tqdm import tqdm

from .space import OptimizerSpec
from .store import RAISED, Store
from .trial import TrialResult, one_thread, package_version, run_trial, trial_key
from .workloads.base import get_workload

QUICK = {"trials": 8, "studies": 1, "seeds": 1}
FULL = {"trials": 20, "studies": 5, "seeds": 1}
QUICK_OPTIMIZERS = ("adamw", "nadamw", "sgd", "lion", "adan", "ademamix")


@dataclass(frozen=True)
class PlannedTrial:
    """One trial of the plan: where it sits (study, trial, seed index) and what it runs."""

    workload_spec: str
    workload: str
    optimizer: str
    study: int
    trial: int
    seed_index: int
    seed: int
    hparams: dict = field(hash=False)
    budget: int
    key: str


def trial_seed(study: int, trial: int, seed_index: int) -> int:
    """The training seed of a trial: distinct per study, trial and seed index, fixed by them."""
    return 10007 * study + 101 * trial + seed_index


def make_plan(workloads: list[str], optimizers: list[str], trials: int, studies: int,
              seeds: int = 1) -> list[PlannedTrial]:
    """The deterministic list of trials of a suite (validates every workload and optimizer first)."""
    for name, n in (("trials", trials), ("studies", studies), ("seeds", seeds)):
        if int(n) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {n!r}")
    specs = {o: OptimizerSpec(o) for o in optimizers}
    plan = []
    for wspec in workloads:
        w = get_workload(wspec)
        for spec in specs.values():
            for study in range(studies):
                for t, point in enumerate(spec.sample(trials, seed=study)):
                    for j in range(seeds):
                        seed = trial_seed(study, t, j)
                        key = trial_key(w.name, int(w.version), spec.name, point, seed, int(w.budget), w.target)
                        plan.append(PlannedTrial(wspec, w.name, spec.name, study, t, j, seed, point,
                                                 int(w.budget), key))
    return plan


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)


def execute(p: PlannedTrial) -> TrialResult:
    """Run one planned trial; an exception inside training is recorded as a failed (diverged) trial whose
    ``error`` starts with ``RAISED`` and names the exception (the report lists such trials)."""
    with one_thread():
        try:
            return run_trial(p.workload_spec, p.optimizer, p.hparams, p.seed, budget=p.budget)
        except Exception as err:  # noqa: BLE001 - the suite goes on; the record says what happened
            w = get_workload(p.workload_spec)
            return TrialResult(key=p.key, workload=p.workload, workload_version=int(w.version), optimizer=p.optimizer,
                               hparams=p.hparams, seed=p.seed, budget=p.budget, target=w.target, reached=False,
                               steps_to_target=None, seconds_to_target=None, best_metric=math.nan,
                               final_metric=math.nan, diverged=True, ms_per_step=0.0, wall_s=0.0,
                               state_bytes_per_param=0.0, log=[], package_version=package_version(),
                               error=f"{RAISED}{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")


def default_jobs() -> int:
    """One worker per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def run_plan(plan: list[PlannedTrial], store: Store, jobs: int = 1, progress: bool = True,
             max_new: int | None = None) -> dict[str, TrialResult]:
    """Run every trial of ``plan`` missing from ``store`` (each stored as soon as it finishes).

    ``jobs`` > 1 uses a spawn-started process pool with one torch thread per worker. ``max_new`` stops after
    that many new trials (used to test resumption). Returns key -> record for the whole plan.
    """
    done = store.keys(settled=True)
    todo, seen = [], set(done)
    for p in plan:
        if p.key not in seen:
            seen.add(p.key)
            todo.append(p)
    if max_new is not None:
        todo = todo[:max_new]
    bar = tqdm(total=len(todo), desc="steepest bench", unit="trial", disable=not progress or not todo,
               dynamic_ncols=True)
    try:
        if jobs <= 1 or len(todo) <= 1:
            for p in todo:
                store.put(execute(p))
                bar.update()
        else:
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
                futures = [pool.submit(execute, p) for p in todo]
                try:
                    for fut in cf.as_completed(futures):
                        store.put(fut.result())
                        bar.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return store.get({p.key for p in plan})
