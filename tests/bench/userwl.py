"""A user-defined workload and optimizer, loaded by import path in the tests."""

import torch
from torch import nn

from steepest.bench import Workload


def make_workload() -> Workload:
    """1-D least squares: minimize (theta - 3)^2 with noise."""
    def build(seed):
        return nn.Linear(1, 1, bias=False)

    def loss(model, noise):
        return ((model.weight.squeeze() - 3.0) ** 2) + 0.01 * noise * model.weight.squeeze()

    return Workload(name="user_ls", version=1, kind="toy", description="toy", build=build,
                    batch=lambda g: torch.randn((), generator=g), loss=loss,
                    evaluate=lambda m: float((m.weight.squeeze() - 3.0).abs()), metric="|theta-3|", mode="min",
                    budget=40, target=0.5, eval_every=5)


def broken_factory():
    """Raises, to test the error path."""
    raise RuntimeError("boom")


class MySGD(torch.optim.SGD):
    """A user optimizer without a search space (uses the default lr space)."""


class CrashingSGD(torch.optim.SGD):
    """A user optimizer whose step raises after ``max_steps`` steps (an operation it does not support)."""

    max_steps = 2

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > self.max_steps:
            raise NotImplementedError("this optimizer cannot step a third time")
        return super().step(closure)


class NaNSGD(torch.optim.SGD):
    """A user optimizer whose third step turns the params into NaN (a numerical divergence, not an exception)."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        out = super().step(closure)
        if self.calls >= 3:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return out


class BadSpaceSGD(torch.optim.SGD):
    """A user optimizer whose search space includes invalid (negative) learning rates."""

    search_space = {"lr": ("uniform", -1.0, 1.0)}


def _slow(name: str) -> Workload:
    """The least-squares workload under another name, ~0.8 s per trial (so that two workers share a queue), and
    logging every trial it trains to the file $STEEPEST_TEST_RUNLOG (to count how often each trial runs)."""
    import dataclasses
    import os
    import time

    w = make_workload()
    build, evaluate = w.build, w.evaluate

    def logged_build(seed):
        log = os.environ.get("STEEPEST_TEST_RUNLOG")
        if log:
            with open(log, "a") as fh:
                fh.write(f"{name} {seed} {os.getpid()}\n")
        return build(seed)

    def slow_evaluate(model):
        time.sleep(0.1)
        return evaluate(model)

    return dataclasses.replace(w, name=name, build=logged_build, evaluate=slow_evaluate)


def make_slow_a() -> Workload:
    """Slow least squares, first copy."""
    return _slow("user_slow_a")


def make_slow_b() -> Workload:
    """Slow least squares, second copy."""
    return _slow("user_slow_b")
