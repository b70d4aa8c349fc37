"""The method registry: name -> optimizer class and what a user (and the test suite) must know of it."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("first-order", "matrix", "curvature", "memory-lean", "zeroth-order", "parameter-free",
            "schedule-free", "wrapper")
NEEDS = ("closure", "hvp", "matrix-params", "sampled-labels", "loss-value", "model")
STATUSES = ("done", "experimental")


@dataclass(frozen=True)
class MethodInfo:
    """Registry metadata of one method.

    Attributes:
        name: the lowercase name used by the CLI and the benchmark (``adamw``).
        cls: the optimizer class.
        family: one of FAMILIES.
        paper: authors, year and title.
        arxiv: arXiv id, or "" for classical methods.
        reference: the authors' code or the oracle the tests check against.
        state_words: optimizer state per parameter, in parameter-sized words (Adam: 2).
        needs: what a step needs beyond gradients (subset of NEEDS); "model" means the constructor takes
            the nn.Module itself (its layers are hooked), not a parameter list.
        status: "done" when it meets the definition of done, else "experimental".
        example_kwargs: hyperparameters that suit a small test problem (lr scaled to it).
        conformance_skip: conformance check name -> why it does not apply to this method.
        search_space: hyperparameter name -> (distribution, low, high) for the benchmark's tuner.
        reread_words: param-sized words a step must read a second time because its update waits on a reduction
            over the whole model (a global step size) or over a whole tensor (a per-tensor cosine or norm): the
            words do not stay in cache between the two reads (the model never; a tensor larger than the
            last-level cache share of a core, as the benchmark's 1.6 MB ones: read twice in a row, the second read
            costs 0.7 of the first there). Counted in the method's memory-traffic floor
            (benchmarks/step_speed.py).
    """

    name: str
    cls: type
    family: str
    paper: str
    arxiv: str
    reference: str
    state_words: float
    needs: tuple[str, ...] = ()
    status: str = "done"
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    conformance_skip: dict[str, str] = field(default_factory=dict)
    search_space: dict[str, tuple] = field(default_factory=dict)
    reread_words: int = 0


REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, **meta: Any) -> Callable[[type], type]:
    """Class decorator adding an optimizer to the registry under ``name``."""

    def deco(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({REGISTRY[name].cls.__name__}, {cls.__name__})")
        info = MethodInfo(name=name, cls=cls, **meta)
        if info.family not in FAMILIES:
            raise ValueError(f"{name}: family must be one of {FAMILIES}, got {info.family!r}")
        bad = set(info.needs) - set(NEEDS)
        if bad:
            raise ValueError(f"{name}: unknown needs {sorted(bad)}; known: {NEEDS}")
        if info.status not in STATUSES:
            raise ValueError(f"{name}: status must be one of {STATUSES}, got {info.status!r}")
        REGISTRY[name] = info
        cls.registry_name = name
        return cls

    return deco


def get(name: str) -> MethodInfo:
    """The registered method called ``name`` (case-insensitive); suggests the closest on a miss."""
    key = name.lower()
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, REGISTRY, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(REGISTRY))}"
    raise KeyError(f"unknown method {name!r}{hint}")


def methods() -> list[MethodInfo]:
    """Every registered method, sorted by family then name."""
    return sorted(REGISTRY.values(), key=lambda m: (FAMILIES.index(m.family), m.name))
