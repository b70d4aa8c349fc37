"""Which steps really ran a compiled kernel: a record of every call of the engine's fused path.

A compiled kernel in ``opt._kernels`` or a new graph in ``compiled_graphs()`` says a kernel was built, not that it
ran: a step whose fused path skips its kernels still matches the eager trajectory (it is the eager step). Tests
of the fused path record its calls and check that, once the kernels are ready, every planned tensor was done.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import pytest

from steepest.core import base

_SIGNATURE = inspect.signature(base.Optimizer._run_fused)


@dataclass
class FusedCall:
    opt: object
    given: int  # params the call was given (fused or not)
    planned: list[int]  # indices of the plan (those a kernel should update)
    done: list[int]  # indices the call returned as updated by a kernel

    @property
    def all_done(self) -> bool:
        return bool(self.planned) and sorted(self.done) == sorted(self.planned)


class FusedCalls(list):
    """The recorded calls, oldest first; ``mark()`` and ``since(mark)`` pick out those of a few steps."""

    def mark(self) -> int:
        return len(self)

    def since(self, mark: int, opt=None) -> list[FusedCall]:
        return [c for c in self[mark:] if opt is None or c.opt is opt]

    def assert_all_fused(self, mark: int = 0, opt=None, calls: int | None = None) -> list[FusedCall]:
        """Every call since mark (of opt, if given) updated every tensor of its plan; there was at least one
        (exactly ``calls`` if given)."""
        recorded = self.since(mark, opt)
        assert recorded, "no step went through the fused path"
        if calls is not None:
            assert len(recorded) == calls, f"{len(recorded)} fused-path calls, expected {calls}"
        missed = [(c.given, c.planned, c.done) for c in recorded if not c.all_done]
        assert not missed, f"fused-path calls that left planned tensors to the eager path: {missed}"
        return recorded


@contextlib.contextmanager
def recording_fused_calls():
    """Patch ``Optimizer._run_fused`` (no optimizer overrides it) to record each call; yields a FusedCalls."""
    original = base.Optimizer._run_fused
    calls = FusedCalls()

    def recorded(self, *args, **kwargs):
        done = original(self, *args, **kwargs)
        bound = _SIGNATURE.bind(self, *args, **kwargs)
        calls.append(FusedCall(self, len(bound.arguments["params"]), list(bound.arguments["plan"].order),
                               list(done)))
        return done

    with pytest.MonkeyPatch.context() as m:
        m.setattr(base.Optimizer, "_run_fused", recorded)
        yield calls
