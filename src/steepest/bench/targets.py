"""Target setting (``steepest bench targets``), after AlgoPerf's procedure (Dahl et al. 2023, arXiv 2306.07179,
Sec. 4.3), scaled down.

Per workload: tune AdamW, NAdamW and Nesterov momentum (those registered) with N Halton trials each at the
workload's ``search_budget``; rerun the single best configuration with S fresh seeds; the target is the median
of their best validation metric; the step budget is the median number of steps those reruns needed to reach it,
times 1.33, rounded up to a whole number of evaluations. The result is written as a new versioned file
``targets_v<N+1>.json``: targets change only by a new version, never by editing one.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..core.registry import REGISTRY
from .runner import PlannedTrial, run_plan, trial_seed
from .space import OptimizerSpec
from .store import Store
from .trial import trial_key
from .workloads.base import _TARGETS_DIR, frozen_targets, get_workload

BASELINES = ("adamw", "nadamw", "sgd")
BUDGET_FACTOR = 1.33


def _planned(w, opt: str, point: dict, seed: int, study: int, trial: int, budget: int) -> PlannedTrial:
    key = trial_key(w.name, int(w.version), opt, point, seed, budget, w.target)
    return PlannedTrial(w.name, w.name, opt, study, trial, 0, seed, point, budget, key)


def round_easier(x: float, mode: str, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits towards the easier side (up for "min", down for "max"),
    so that rounding never makes the median rerun miss its own target."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    scale = 10.0 ** (math.floor(math.log10(abs(x))) - digits + 1)
    return float(f"{(math.ceil(x / scale) if mode == 'min' else math.floor(x / scale)) * scale:.{digits}g}")


def steps_to_reach(log: list[list[float]], target: float, mode: str) -> int | None:
    """The first logged step whose metric meets ``target`` (None if none does)."""
    for step, _, _, metric in log:
        if (metric <= target) if mode == "min" else (metric >= target):
            return int(step)
    return None


def set_targets(workloads: list[str], store: Store, trials: int = 12, seeds: int = 3, jobs: int = 1,
                progress: bool = True) -> dict:
    """Run the target-setting procedure on ``workloads``; return the new targets document (not yet written)."""
    baselines = [b for b in BASELINES if b in REGISTRY]
    if not baselines:
        raise RuntimeError(f"target setting needs at least one of {BASELINES} registered")
    entries = {}
    for spec in workloads:
        w = get_workload(spec)
        budget = int(w.search_budget)
        plan = [_planned(w, b, pt, trial_seed(0, t, 0), 0, t, budget)
                for b in baselines for t, pt in enumerate(OptimizerSpec(b).sample(trials, seed=0))]
        recs = run_plan(plan, store, jobs=jobs, progress=progress)
        sign = 1.0 if w.mode == "min" else -1.0
        ok = [(p, recs[p.key]) for p in plan if p.key in recs and math.isfinite(recs[p.key].best_metric)]
        if not ok:
            raise RuntimeError(f"target setting for {w.name!r}: every baseline trial diverged")
        best_p, _ = min(ok, key=lambda pr: sign * pr[1].best_metric)
        reruns = [_planned(w, best_p.optimizer, best_p.hparams, 1000 + s, 1, s, budget) for s in range(seeds)]
        rr = run_plan(reruns, store, jobs=jobs, progress=progress)
        metrics = [rr[p.key].best_metric for p in reruns]
        target = round_easier(statistics.median(metrics), w.mode)
        needed = [steps_to_reach(rr[p.key].log, target, w.mode) for p in reruns]
        reached = [n for n in needed if n is not None]
        steps = statistics.median(reached) if reached else budget
        new_budget = int(math.ceil(BUDGET_FACTOR * steps / w.eval_every) * w.eval_every)
        new_budget, confirmed = confirm_budget(w, best_p.optimizer, best_p.hparams, target, new_budget,
                                               [p.seed for p in reruns])
        if new_budget is None:
            # No shorter schedule confirmed: the reruns themselves ran under the search budget's schedule.
            new_budget = budget
            confirmed = [p.seed for p, n in zip(reruns, needed) if n is not None]
        entries[w.name] = {"target": target, "budget": new_budget, "eval_every": int(w.eval_every),
                           "search_budget": budget, "metric": w.metric, "mode": w.mode,
                           "reference": {"optimizer": best_p.optimizer, "hparams": best_p.hparams},
                           "rerun_best_metrics": metrics, "rerun_steps_to_target": needed,
                           "confirmed_seeds_reaching_at_budget": confirmed,
                           "procedure": f"{trials} Halton trials of each of {baselines} at {budget} steps; best "
                                        f"rerun with {seeds} seeds; target = median best metric; budget = "
                                        f"{BUDGET_FACTOR} x median steps to target (grown by {BUDGET_FACTOR}x "
                                        "until most reruns reach the target under the budget's own schedule)"}
    version = int(frozen_targets()["version"]) + 1
    old = dict(frozen_targets()["workloads"])
    old.update(entries)
    return {"version": version, "workloads": old}


def confirm_budget(w, optimizer: str, hparams: dict, target: float, budget: int, seeds: list[int],
                   max_growths: int = 4) -> tuple[int | None, list[int]]:
    """Grow ``budget`` by 1.33x until most of ``seeds`` reach ``target`` with the schedule of that budget.

    The cosine schedule depends on the budget, so the steps a run needed under the search budget need not suffice
    under a shorter one; this closes that gap. Returns (budget, seeds that reached), or (None, []) when no
    budget tried (up to ``max_growths`` growths) was confirmed.
    """
    import dataclasses

    from .trial import run_trial
    reached: list[int] = []
    for _ in range(max_growths + 1):
        if dataclasses.is_dataclass(w):
            trial_w = dataclasses.replace(w, target=target, budget=budget)
        else:  # a user workload of another class: a shallow copy with the candidate target and budget
            import copy
            trial_w = copy.copy(w)
            trial_w.target, trial_w.budget = target, budget
        reached = [s for s in seeds if run_trial(trial_w, optimizer, hparams, s, budget=budget).reached]
        if 2 * len(reached) > len(seeds):
            return budget, reached
        budget = int(math.ceil(BUDGET_FACTOR * budget / w.eval_every) * w.eval_every)
    return None, []


def write_targets(doc: dict, directory: str | Path | None = None) -> Path:
    """Write ``doc`` as ``targets_v<version>.json`` in ``directory`` (default: the package's workloads folder).

    Refuses to overwrite an existing version: targets change only by a new version.
    """
    d = Path(directory) if directory is not None else _TARGETS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"targets_v{doc['version']}.json"
    if path.exists():
        raise FileExistsError(f"{path} exists; targets change only by a new version -- bump 'version'")
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path
