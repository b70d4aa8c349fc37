"""Search spaces, quasi-random Halton sampling and the mapping of sampled points to optimizer kwargs.

External tuning as in AlgoPerf (Dahl et al. 2023, arXiv 2306.07179, Sec. 4.4): every trial of a study is
a point of a quasi-random (Halton 1960) sequence over the optimizer's search space.

Convention: ``name -> ("log" | "uniform", low, high)``. Keys are constructor kwargs, except
``one_minus_beta1`` (betas[0] = 1 - x, the other betas at the class default) and ``one_minus_momentum``
(momentum = 1 - x).
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from typing import Any

import numpy as np
import torch

from ..core.registry import REGISTRY, get
from .workloads.base import import_object

DEFAULT_SPACE: dict[str, tuple] = {"lr": ("log", 1e-4, 1e-1)}
# Settings every trial of a method uses unless its search space samples them (the baseline's fixed choices).
FIXED: dict[str, dict[str, Any]] = {"sgd": {"momentum": 0.9, "nesterov": True}}
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)


def radical_inverse(i: int, base: int) -> float:
    """The van der Corput radical inverse of integer ``i`` in ``base``."""
    f, r = 1.0, 0.0
    while i > 0:
        f /= base
        r += f * (i % base)
        i //= base
    return r


def halton(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n points of the Halton sequence in [0, 1)^dim (Halton 1960), skipping the origin.

    Each study uses its own random shift modulo 1 (Cranley & Patterson 1976) drawn from ``seed``, so that
    studies with different seeds see different, still low-discrepancy, points. Seed 0 is the plain sequence.
    """
    if dim > len(_PRIMES):
        raise ValueError(f"halton: at most {len(_PRIMES)} dimensions, got {dim}")
    pts = np.array([[radical_inverse(i, _PRIMES[d]) for d in range(dim)] for i in range(1, n + 1)])
    if seed:
        pts = (pts + np.random.default_rng(seed).random(dim)) % 1.0
    return pts.reshape(n, dim)


def _ctor_params(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    sig = inspect.signature(cls.__init__)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return dict(sig.parameters), var_kw


# What a registered method may need that the benchmark's training loop cannot give it, and why.
UNSUPPORTED_NEEDS = {
    "sampled-labels": "its curvature estimate needs labels sampled from the model's own predictions "
                      "(workload-specific); benchmark it from your own loop",
}


class OptimizerSpec:
    """An optimizer as the benchmark sees it: a class, its search space and its fixed settings.

    ``spec`` is a registry name (``adamw``) or an import path ``pkg.mod:Class``; a class without a
    ``search_space`` attribute and a registry entry without one use ``DEFAULT_SPACE`` (lr log-uniform
    in [1e-4, 1e-1]).
    """

    def __init__(self, spec: str):
        self.spec = spec
        if ":" in spec:
            self.cls = import_object(spec, "optimizer")
            if not (isinstance(self.cls, type) and issubclass(self.cls, torch.optim.Optimizer)):
                raise TypeError(f"optimizer {spec!r} is not a torch.optim.Optimizer subclass")
            self.name = spec
            space = getattr(self.cls, "search_space", None)
            self.fixed = dict(getattr(self.cls, "bench_fixed", {}))
            self.needs = tuple(getattr(self.cls, "needs", ()))
        else:
            try:
                info = get(spec)
            except KeyError as err:
                raise KeyError(f"{err.args[0]} (or give an import path 'pkg.mod:OptimizerClass')") from None
            self.cls, self.name, space = info.cls, info.name, info.search_space
            self.fixed = dict(FIXED.get(info.name, {}))
            self.needs = tuple(info.needs)
        unsupported = set(self.needs) & set(UNSUPPORTED_NEEDS)
        if unsupported:
            raise ValueError(f"optimizer {spec!r} needs {sorted(unsupported)}, which the benchmark's training loop "
                             f"does not provide; {UNSUPPORTED_NEEDS[sorted(unsupported)[0]]}")
        self.space = dict(space) if space else dict(DEFAULT_SPACE)
        self.keys = sorted(self.space)
        validate_space(self)

    def sample(self, n: int, seed: int) -> list[dict[str, float]]:
        """n hyperparameter points from the (shifted) Halton sequence of study ``seed``."""
        pts = halton(n, len(self.keys), seed)
        out = []
        for row in pts:
            point = {}
            for k, u in zip(self.keys, row):
                dist, lo, hi = self.space[k]
                v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if dist == "log" else lo + u * (hi - lo)
                point[k] = float(f"{v:.6g}")  # stable, readable and hash-friendly
            out.append(point)
        return out

    def kwargs(self, point: dict[str, float]) -> dict[str, Any]:
        """Constructor kwargs for a sampled point (applies the one_minus_* conventions and the fixed settings)."""
        kw = dict(self.fixed)
        params, _ = _ctor_params(self.cls)
        for k, v in point.items():
            if k == "one_minus_beta1":
                default = params["betas"].default if "betas" in params else (0.9, 0.999)
                kw["betas"] = (1.0 - v, *tuple(default)[1:])
            elif k == "one_minus_momentum":
                kw["momentum"] = 1.0 - v
            else:
                kw[k] = v
        return kw

    def build(self, params, point: dict[str, float]) -> torch.optim.Optimizer:
        """The optimizer over ``params`` at hyperparameter ``point``."""
        return self.cls(params, **self.kwargs(point))


def validate_space(opt: OptimizerSpec) -> None:
    """Check a search space: known distributions, low < high, positive bounds for log, kwargs the class accepts,
    and both corners accepted by the optimizer's own validation. Raises ValueError naming the fix."""
    where = f"search space of optimizer {opt.name!r}"
    params, var_kw = _ctor_params(opt.cls)
    for k, entry in opt.space.items():
        if not (isinstance(entry, tuple | list) and len(entry) == 3):
            raise ValueError(f"{where}: {k!r} must be ('log' | 'uniform', low, high), got {entry!r}")
        dist, lo, hi = entry
        if dist not in ("log", "uniform"):
            raise ValueError(f"{where}: {k!r} has distribution {dist!r}; use 'log' or 'uniform'")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"{where}: {k!r} needs finite low < high, got ({lo!r}, {hi!r})")
        if dist == "log" and lo <= 0:
            raise ValueError(f"{where}: {k!r} is log-uniform so low must be > 0, got {lo!r}")
        if k in ("one_minus_beta1", "one_minus_momentum"):
            if lo < 0 or hi > 1:
                raise ValueError(f"{where}: {k!r} must lie in [0, 1] (it sets 1 - x), got ({lo!r}, {hi!r})")
            target = "betas" if k == "one_minus_beta1" else "momentum"
        else:
            target = k
        if target not in params and not var_kw:
            close = difflib.get_close_matches(target, [p for p in params if p not in ("self", "params")], n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{where}: {k!r} is not an argument of {opt.cls.__name__}{hint}")
    for corner in (0.0, 1.0 - 1e-12):
        point = {}
        for k, (_, lo, hi) in opt.space.items():
            point[k] = lo if corner == 0.0 else hi
        try:
            # Only the hyperparameter checks matter here (e.g. K-FAC's "no model given" warning does not).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.build([torch.zeros(2, requires_grad=True)], point)
        except Exception as err:
            raise ValueError(f"{where}: {opt.cls.__name__} rejects the corner {point} "
                             f"({type(err).__name__}: {err}); narrow the space to its valid range") from err


def known_optimizers() -> list[str]:
    """Registered optimizer names."""
    return sorted(REGISTRY)
