"""A benchmark suite end to end: plan, run (resumable), and aggregate into per-workload and overall measures.

Implements the AlgoPerf external-tuning protocol (Dahl et al. 2023, arXiv 2306.07179) at CPU scale.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from . import measures as M
from .runner import PlannedTrial, make_plan, run_plan
from .store import Store
from .trial import TrialResult
from .workloads.base import get_workload


@dataclass
class Cell:
    """Measures of one optimizer on one workload."""

    workload: str
    optimizer: str
    steps_to_target: float
    seconds_to_target: float
    best_metric: float
    final_metric: float
    divergence_fraction: float
    state_bytes_per_param: float
    ms_per_step: float
    best_hparams: dict
    n_trials: int
    ratio: float = math.inf


@dataclass
class SuiteResult:
    """Everything the report shows: the plan, its records, per-cell measures and the cross-workload scores."""

    config: dict
    plan: list[PlannedTrial]
    records: dict[str, TrialResult]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    workloads: list[str] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    speedups: dict[str, tuple[float, int]] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """Optimizers by benchmark score, best first (ties: more workloads reached, then name)."""
        reached = {o: sum(math.isfinite(t) for t in self.times[o].values()) for o in self.optimizers}
        return sorted(self.optimizers, key=lambda o: (-self.scores[o], -reached[o], o))


def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else math.nan


def aggregate(config: dict, plan: list[PlannedTrial], records: dict[str, TrialResult]) -> SuiteResult:
    """Per-cell measures, performance ratios, AlgoPerf scores and geometric-mean speed-ups vs AdamW."""
    res = SuiteResult(config=config, plan=plan, records=records)
    groups: dict[tuple[str, str], dict[tuple[int, int], list[TrialResult]]] = defaultdict(lambda: defaultdict(list))
    for p in plan:
        if p.key in records:
            groups[(p.workload, p.optimizer)][(p.study, p.trial)].append(records[p.key])
        if p.workload not in res.workloads:
            res.workloads.append(p.workload)
        if p.optimizer not in res.optimizers:
            res.optimizers.append(p.optimizer)
    for (w, o), trials in groups.items():
        mode = get_workload_mode(config, w)
        per_study_steps: dict[int, list[float]] = defaultdict(list)
        per_study_secs: dict[int, list[float]] = defaultdict(list)
        best_key, best_rank = None, None
        recs = [r for rs in trials.values() for r in rs]
        for (study, t), rs in trials.items():
            steps = _median([r.steps_to_target if r.reached else math.inf for r in rs])
            secs = _median([r.seconds_to_target if r.reached else math.inf for r in rs])
            per_study_steps[study].append(steps)
            per_study_secs[study].append(secs)
            bm = _median([r.best_metric for r in rs])
            rank = (steps, (bm if mode == "min" else -bm) if not math.isnan(bm) else math.inf)
            if best_rank is None or rank < best_rank:
                best_key, best_rank = (study, t), rank
        best = trials[best_key]
        res.cells[(w, o)] = Cell(
            workload=w, optimizer=o, steps_to_target=M.time_to_target(per_study_steps),
            seconds_to_target=M.time_to_target(per_study_secs),
            best_metric=_median([r.best_metric for r in best]), final_metric=_median([r.final_metric for r in best]),
            divergence_fraction=sum(r.diverged for r in recs) / len(recs),
            state_bytes_per_param=_median([r.state_bytes_per_param for r in recs if not r.error]),
            ms_per_step=_median([r.ms_per_step for r in recs if not r.diverged]),
            best_hparams=best[0].hparams, n_trials=len(recs))
    res.times = {o: {w: res.cells[(w, o)].steps_to_target for w in res.workloads if (w, o) in res.cells}
                 for o in res.optimizers}
    res.ratios = M.performance_ratios(res.times)
    for (w, o), c in res.cells.items():
        c.ratio = res.ratios[o][w]
    res.scores = M.algoperf_score(res.ratios)
    res.speedups = M.geomean_speedup(res.times, "adamw")
    return res


def get_workload_mode(config: dict, name: str) -> str:
    """The metric direction of workload ``name`` (looked up through the suite's workload specs)."""
    for spec in config.get("workloads", []):
        w = get_workload(spec)
        if w.name == name:
            return w.mode
    return "min"


def run_suite(workloads: list[str], optimizers: list[str], trials: int, studies: int, seeds: int, store: Store,
              jobs: int = 1, progress: bool = True, max_new: int | None = None, engine: str = "local",
              ray_address: str | None = None, storage: str | None = None,
              study_name: str | None = None) -> SuiteResult:
    """Plan the suite, run what the store lacks, and aggregate (the ``steepest bench`` command).

    ``engine="ray"`` fans trials out over a Ray cluster instead of the local pool; ``engine="optuna"`` puts them
    in a shared Optuna study (RDB ``storage``, default the store's database) that workers on other machines may
    join (``steepest bench worker``). Both are optional extras and give the same records as the local pool.
    """
    config = {"workloads": list(workloads), "optimizers": list(optimizers), "trials": int(trials),
              "studies": int(studies), "seeds": int(seeds)}
    plan = make_plan(workloads, optimizers, trials, studies, seeds)
    store.save_suite(config)
    if engine == "ray":
        from .ray_engine import run_plan_ray
        records = run_plan_ray(plan, store, address=ray_address, progress=progress)
    elif engine == "optuna":
        from .optuna_engine import run_plan_optuna
        records = run_plan_optuna(plan, store, config, storage=storage, study_name=study_name, jobs=jobs,
                                  progress=progress)
    elif engine == "local":
        records = run_plan(plan, store, jobs=jobs, progress=progress, max_new=max_new)
    else:
        raise ValueError(f"engine must be 'local', 'ray' or 'optuna', got {engine!r}")
    return aggregate(config, plan, records)


def suite_from_store(store: Store, config: dict | None = None) -> SuiteResult:
    """Re-aggregate the last suite run against ``store`` (or ``config``) from stored records only."""
    config = config or store.last_suite()
    if config is None:
        raise ValueError(f"results store {store.url!r} has no suite yet; run `steepest bench --store ...` first")
    plan = make_plan(config["workloads"], config["optimizers"], config["trials"], config["studies"], config["seeds"])
    return aggregate(config, plan, store.get({p.key for p in plan}))
