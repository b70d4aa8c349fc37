"""The Workload protocol of ``steepest bench`` and the loading of workloads by name or import path.

A workload is what AlgoPerf (Dahl et al. 2023, arXiv 2306.07179) and DeepOBS (Schneider et al. 2019,
arXiv 1903.05499) call a test problem: model + data + loss + validation metric + step budget + target.
"""

from __future__ import annotations

import difflib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_TARGETS_DIR = Path(__file__).parent


@dataclass
class Workload:
    """One benchmark problem (the AlgoPerf "workload", DeepOBS "test problem").

    Build your own with this class and point ``steepest bench --workloads mypkg.mod:make_workload`` at a
    zero-argument function returning it. Fields:

    * ``name``, ``version`` (int; bump it whenever data, model, budget or target change), ``kind``,
      ``description``;
    * ``build(seed) -> nn.Module``: a freshly initialised model (the seed fixes the initialisation);
    * ``batch(generator) -> batch``: one training minibatch drawn with ``generator`` (a torch.Generator);
    * ``loss(model, batch) -> Tensor``: the scalar training loss;
    * ``evaluate(model) -> float``: the validation metric (called under ``torch.no_grad`` in eval mode);
    * ``metric`` (its name), ``mode`` (``"min"`` or ``"max"``: which direction is better);
    * ``budget``: optimizer steps per trial; ``target``: the validation metric to reach;
    * ``eval_every``: steps between evaluations (the resolution of time-to-target);
    * ``optimum``: the metric's known best value where the problem has one (else None);
    * ``search_budget``: steps the target-setting procedure may use (defaults to 2 x budget).
    """

    name: str
    version: int
    kind: str
    description: str
    build: Callable[[int], nn.Module]
    batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], float]
    metric: str
    mode: str
    budget: int
    target: float | None
    eval_every: int
    optimum: float | None = None
    search_budget: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"workload {self.name!r}: mode must be 'min' or 'max', got {self.mode!r}")
        if int(self.budget) < 1 or int(self.eval_every) < 1:
            raise ValueError(f"workload {self.name!r}: budget and eval_every must be positive integers, got "
                             f"budget={self.budget!r}, eval_every={self.eval_every!r}")
        if self.search_budget is None:
            self.search_budget = 2 * int(self.budget)

    def reached(self, metric: float) -> bool:
        """Whether ``metric`` meets the target (False when there is no target or the metric is not finite)."""
        if self.target is None or metric != metric:
            return False
        return metric <= self.target if self.mode == "min" else metric >= self.target

    def better(self, a: float, b: float) -> bool:
        """Whether metric ``a`` is strictly better than ``b`` (NaN is never better)."""
        if a != a:
            return False
        if b != b:
            return True
        return a < b if self.mode == "min" else a > b


_REQUIRED = ("name", "version", "build", "batch", "loss", "evaluate", "metric", "mode", "budget", "target",
             "eval_every")


def check_workload(w: Any, origin: str) -> Any:
    """Check that ``w`` (from ``origin``) has every attribute of the Workload protocol; raise a clear error if not."""
    missing = [a for a in _REQUIRED if not hasattr(w, a)]
    if missing:
        raise TypeError(f"workload from {origin!r} lacks {', '.join(missing)}; return a "
                        "steepest.bench.Workload (see its docstring for the protocol)")
    if getattr(w, "mode", None) not in ("min", "max"):
        raise ValueError(f"workload from {origin!r}: mode must be 'min' or 'max', got {w.mode!r}")
    return w


@lru_cache(maxsize=1)
def frozen_targets() -> dict[str, Any]:
    """The newest frozen targets file ``targets_v<N>.json`` shipped in this package, parsed.

    Targets change only by a new version: ``steepest bench targets`` writes a new file and never edits one.
    """
    files = sorted(_TARGETS_DIR.glob("targets_v*.json"), key=lambda p: int(p.stem.split("_v")[1]))
    if not files:
        return {"version": 0, "workloads": {}}
    return json.loads(files[-1].read_text())


_BUILTIN: dict[str, Callable[[], Workload]] = {}


def builtin(fn: Callable[[], Workload]) -> Callable[[], Workload]:
    """Register a zero-argument built-in workload factory under its function name."""
    _BUILTIN[fn.__name__] = fn
    return fn


def builtin_names() -> list[str]:
    """The names of the built-in workloads, in suite order."""
    from . import builtin as _  # noqa: F401 - registers the built-ins
    return list(_BUILTIN)


def import_object(path: str, what: str) -> Any:
    """Import ``package.module:attribute``; a clear error naming ``what`` and the fix when it fails."""
    if ":" not in path:
        raise ValueError(f"{what} {path!r}: an import path must look like 'package.module:name'")
    mod_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as err:
        raise ImportError(f"{what} {path!r}: importing module {mod_name!r} failed ({type(err).__name__}: {err}); "
                          "check that it is installed or on PYTHONPATH") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{what} {path!r}: module {mod_name!r} has no attribute {attr!r}") from None


_CACHE: dict[str, Any] = {}


def get_workload(spec: str) -> Any:
    """The workload named ``spec`` (built-in) or made by the factory at import path ``pkg.mod:make_workload``.

    Unknown names raise a KeyError suggesting the closest built-in names.
    """
    if spec in _CACHE:
        return _CACHE[spec]
    if ":" in spec:
        factory = import_object(spec, "workload")
        try:
            w = factory() if callable(factory) and not hasattr(factory, "build") else factory
        except Exception as err:
            raise RuntimeError(f"workload factory {spec!r} raised {type(err).__name__}: {err}") from err
        w = check_workload(w, spec)
    else:
        names = builtin_names()
        if spec not in _BUILTIN:
            close = difflib.get_close_matches(spec, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(names)}"
            raise KeyError(f"unknown workload {spec!r}; {hint} (or give an import path 'pkg.mod:make_workload')")
        w = _BUILTIN[spec]()
    _CACHE[spec] = w
    return w
