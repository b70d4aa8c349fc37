"""Weight averaging: EMA, SWA and Switch-EMA, shaped like ``torch.optim.swa_utils.AveragedModel``.

Each averager is an ``nn.Module`` holding a copy of the model (``.module``) and ``n_averaged``; call
``update_parameters(model)`` after optimizer steps, evaluate the averager directly (``averager(x)``) or swap
its weights into the live model with ``with averager.swapped(model): ...``. ``state_dict`` keys match
``AveragedModel``'s (``module.*``, ``n_averaged``), so checkpoints load both ways. Nothing here depends on
the optimizer.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Iterable, Iterator
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["AveragedWeights", "EMA", "SWA", "SwitchEMA", "update_bn", "ema_decay"]


def _check_model(model: Any, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")


def _check_decay(decay: Any) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not math.isfinite(decay) \
            or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1] (e.g. 0.999), got {decay!r}")
    return float(decay)


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """The EMA decay for the update after ``num_updates`` earlier ones: ``decay``, or with ``warmup``
    ``min(decay, (1 + t) / (10 + t))`` (the warm-up of TensorFlow's ``ExponentialMovingAverage``; Tarvainen
    & Valpola 2017, arXiv 1703.01780, use a similar ramp)."""
    if not warmup:
        return decay
    t = num_updates
    return min(decay, (1.0 + t) / (10.0 + t))


class AveragedWeights(nn.Module):
    """Base of the averagers: a copy of ``model`` whose parameters (and buffers, with ``use_buffers``) are
    averaged by :meth:`update_parameters`; like ``torch.optim.swa_utils.AveragedModel`` (Izmailov et al.
    2018, "Averaging Weights Leads to Wider Optima and Better Generalization", arXiv 1803.05407).

    The first update copies the model's weights; later ones call :meth:`_average`. Without
    ``use_buffers`` the buffers (e.g. BatchNorm statistics) are copied from the model at each update, as
    torch does; recompute them for the averaged weights with :func:`update_bn`.
    """

    n_averaged: Tensor

    def __init__(self, model: nn.Module, *, device: torch.device | str | int | None = None,
                 use_buffers: bool = False) -> None:
        _check_model(model)
        super().__init__()
        self.module = deepcopy(model)
        if device is not None:
            self.module = self.module.to(device)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.use_buffers = bool(use_buffers)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged model."""
        return self.module(*args, **kwargs)

    def _tensors(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        if self.use_buffers:
            mine = itertools.chain(self.module.parameters(), self.module.buffers())
            theirs = itertools.chain(model.parameters(), model.buffers())
        else:
            mine, theirs = self.module.parameters(), model.parameters()
        a, b = list(mine), list(theirs)
        if len(a) != len(b):
            raise ValueError(f"model has {len(b)} tensors to average but the averaged copy has {len(a)}; pass the "
                             f"model this averager was built from")
        return [t.detach() for t in a], [t.detach() for t in b]

    def _average(self, avg: list[Tensor], cur: list[Tensor], n: Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average."""
        _check_model(model)
        avg, cur = self._tensors(model)
        cur = [c.to(a.device) for a, c in zip(avg, cur)]
        if int(self.n_averaged) == 0:
            for a, c in zip(avg, cur):
                a.copy_(c)
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for a, c in zip(avg, cur):
                ga, gc = groups.setdefault((a.device, a.dtype), ([], []))
                ga.append(a)
                gc.append(c)
            for (device, _), (ga, gc) in groups.items():
                self._average(ga, gc, self.n_averaged.to(device))
        if not self.use_buffers:
            for b_avg, b_model in zip(self.module.buffers(), model.buffers()):
                b_avg.detach().copy_(b_model.detach().to(b_avg.device))
        self.n_averaged += 1

    def _swap_pairs(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        _check_model(model)
        mine = list(self.module.parameters()) + list(self.module.buffers())
        theirs = list(model.parameters()) + list(model.buffers())
        if len(mine) != len(theirs) or any(a.shape != b.shape for a, b in zip(mine, theirs)):
            raise ValueError("model does not have the same parameters and buffers as the averaged copy; pass the "
                             "model this averager was built from")
        return [(a.detach(), b.detach()) for a, b in zip(mine, theirs)]

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averaged ones."""
        for avg, live in self._swap_pairs(model):
            live.copy_(avg.to(live.device))

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``model`` holds the averaged parameters and buffers (e.g. for evaluation);
        its own are restored on exit, even after an exception."""
        pairs = self._swap_pairs(model)
        with torch.no_grad():
            saved = [live.clone() for _, live in pairs]
            for avg, live in pairs:
                live.copy_(avg.to(live.device))
        try:
            yield model
        finally:
            with torch.no_grad():
                for (_, live), keep in zip(pairs, saved):
                    live.copy_(keep)


class EMA(AveragedWeights):
    """Exponential moving average of the weights (Polyak & Juditsky 1992; as in
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``):
    ``w_ema <- decay_t w_ema + (1 - decay_t) w`` with ``decay_t = decay`` or, with ``warmup=True``,
    ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates (:func:`ema_decay`). Call
    ``update_parameters(model)`` every ``k`` optimizer steps (``k = 1`` usually)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False,
                 device: torch.device | str | int | None = None, use_buffers: bool = False) -> None:
        self.decay = _check_decay(decay)
        self.warmup = bool(warmup)
        super().__init__(model, device=device, use_buffers=use_buffers)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay(self.decay, int(self.n_averaged), self.warmup)

    def _average(self, avg: list[Tensor], cur: list[Tensor], n: Tensor) -> None:
        d = self.current_decay()
        if torch.is_floating_point(avg[0]) or torch.is_complex(avg[0]):
            torch._foreach_lerp_(avg, cur, 1 - d)
        else:  # integer buffers (with use_buffers), as torch does
            for a, c in zip(avg, cur):
                a.copy_(a * d + c * (1 - d))


class SWA(AveragedWeights):
    """Stochastic weight averaging: the equal-weight mean of the weights passed to ``update_parameters``
    (Izmailov et al. 2018, arXiv 1803.05407); the same numbers as ``torch.optim.swa_utils.AveragedModel``
    with its default average. Recompute BatchNorm statistics afterwards with :func:`update_bn`."""

    def _average(self, avg: list[Tensor], cur: list[Tensor], n: Tensor) -> None:
        floating = torch.is_floating_point(avg[0]) or torch.is_complex(avg[0])
        if floating and avg[0].device.type != "cpu":
            torch._foreach_lerp_(avg, cur, float(1 / (n + 1)))  # torch's for-each path on accelerators
            return
        for a, c in zip(avg, cur):
            a.copy_(a + (c - a) / (n + 1))


class SwitchEMA(EMA):
    """Switch-EMA (Li et al. 2024, "Switch EMA: A Free Lunch for Better Flatness and Sharpness",
    arXiv 2402.09240): an EMA of the weights that is copied back into the live model at the end of every
    epoch (:meth:`switch`), so training continues from the averaged weights. The optimizer state is kept.

    Loop: ``update_parameters(model)`` after each optimizer step; ``switch(model)`` at each epoch end.
    """

    @torch.no_grad()
    def switch(self, model: nn.Module) -> None:
        """Copy the EMA weights into ``model`` (parameters, and buffers when ``use_buffers``)."""
        if int(self.n_averaged) == 0:
            return
        _check_model(model)
        pairs = list(zip(self.module.parameters(), model.parameters()))
        if self.use_buffers:
            pairs += list(zip(self.module.buffers(), model.buffers()))
        for avg, live in pairs:
            live.detach().copy_(avg.detach().to(live.device))


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | str | int | None = None) -> None:
    """Recompute BatchNorm running statistics of ``model`` in one pass over ``loader`` (cumulative averages,
    Izmailov et al. 2018, arXiv 1803.05407); same behaviour as ``torch.optim.swa_utils.update_bn``: a batch is
    a tensor or a list/tuple whose first element is the input; the model's mode and momenta are restored."""
    _check_model(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {}
    for m in norms:
        m.reset_running_stats()
        momenta[m] = m.momentum
    was_training = model.training
    model.train()
    for m in norms:
        m.momentum = None
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                x = x.to(device)
            model(x)
    finally:
        for m in norms:
            m.momentum = momenta[m]
        model.train(was_training)
