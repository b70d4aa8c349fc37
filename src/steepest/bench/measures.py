"""Benchmark measures: time-to-target, performance ratios and profiles, the AlgoPerf score, speed-ups.

* Time-to-target of an optimizer on a workload (AlgoPerf external tuning, Dahl et al. 2023,
  arXiv 2306.07179, Sec. 4.4): per study, the best (smallest) time among its trials; then the median over
  studies. A trial that never reaches the target counts as infinite.
* Performance profiles (Dolan & More 2002): r_{o,w} = t_{o,w} / min_o t_{o,w}; ratios above r_max (4)
  count as failures; rho_o(tau) = fraction of workloads with r_{o,w} <= tau.
* Benchmark score (AlgoPerf): the integral of rho_o over tau in [1, r_max], divided by (r_max - 1).
  rho is a step function, so the integral is exact: each workload with ratio r <= r_max adds
  (r_max - r) / (r_max - 1) / |W|.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

INF = math.inf
R_MAX = 4.0


def _t(x: float | None) -> float:
    return INF if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def time_to_target(study_trial_times: Mapping[int, Iterable[float | None]]) -> float:
    """Median over studies of the best trial's time-to-target (None / NaN = not reached = infinite)."""
    bests = [min((_t(t) for t in times), default=INF) for times in study_trial_times.values()]
    if not bests:
        return INF
    return float(np.median(np.array(bests, dtype=float)))


def performance_ratios(times: Mapping[str, Mapping[str, float]], r_max: float = R_MAX) -> dict[str, dict[str, float]]:
    """r[o][w] = t[o][w] / min_o t[o][w], set to infinity above ``r_max`` or when no optimizer reached the target.

    ``times`` maps optimizer -> workload -> time (infinite when not reached).
    """
    workloads = sorted({w for per in times.values() for w in per})
    out: dict[str, dict[str, float]] = {o: {} for o in times}
    for w in workloads:
        best = min((_t(times[o].get(w)) for o in times), default=INF)
        for o in times:
            t = _t(times[o].get(w))
            r = t / best if math.isfinite(best) and math.isfinite(t) and best > 0 else (1.0 if t == best == 0 else INF)
            out[o][w] = r if r <= r_max else INF
    return out


def performance_profile(ratios: Mapping[str, Mapping[str, float]], taus: Iterable[float]) -> dict[str, np.ndarray]:
    """rho_o(tau): the fraction of workloads on which optimizer o is within a factor tau of the best."""
    taus = np.asarray(list(taus), dtype=float)
    out = {}
    for o, per in ratios.items():
        r = np.array(list(per.values()), dtype=float)
        out[o] = (r[None, :] <= taus[:, None]).mean(1) if r.size else np.zeros_like(taus)
    return out


def algoperf_score(ratios: Mapping[str, Mapping[str, float]], r_max: float = R_MAX) -> dict[str, float]:
    """The AlgoPerf benchmark score: (1 / (r_max - 1)) * integral_1^r_max rho_o(tau) dtau, exactly."""
    out = {}
    for o, per in ratios.items():
        r = np.array(list(per.values()), dtype=float)
        if r.size == 0:
            out[o] = 0.0
            continue
        contrib = np.where(np.isfinite(r) & (r <= r_max), (r_max - np.maximum(r, 1.0)) / (r_max - 1.0), 0.0)
        out[o] = float(contrib.mean())
    return out


def geomean_speedup(times: Mapping[str, Mapping[str, float]], baseline: str = "adamw") -> dict[str, tuple[float, int]]:
    """Geometric-mean speed-up t_baseline / t_o over workloads both reached, and how many workloads that is.

    (nan, 0) when there is no such workload or the baseline is absent.
    """
    out = {}
    base = times.get(baseline)
    for o, per in times.items():
        if base is None:
            out[o] = (math.nan, 0)
            continue
        logs = [math.log(_t(base[w]) / _t(t)) for w, t in per.items()
                if w in base and math.isfinite(_t(t)) and math.isfinite(_t(base[w])) and _t(t) > 0]
        out[o] = (math.exp(sum(logs) / len(logs)), len(logs)) if logs else (math.nan, 0)
    return out
