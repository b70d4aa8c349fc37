"""Batch size: learning-rate scaling rules and an adaptive batch size by the norm test.

* Linear scaling for SGD (Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv 1706.02677):
  ``lr -> lr * k`` when the batch grows by ``k``.
* Square-root scaling for Adam-family methods (Malladi et al. 2022, "On the SDEs and Scaling Rules for
  Adaptive Gradient Algorithms", arXiv 2205.10287; Granziol et al. 2022, "Learning Rates as a Function of
  Batch Size", arXiv 2006.09092): ``lr -> lr * sqrt(k)``, and in Malladi et al.'s full rule also
  ``1 - beta -> k (1 - beta)`` and ``eps -> eps / sqrt(k)``.
* :class:`AdaptiveBatchSize`: the norm test of AdAdaGrad (Lau, Liu & Kolar 2024, "AdAdaGrad: Adaptive Batch
  Size Schemes for Adaptive Gradient Methods", arXiv 2402.11215; after Byrd et al. 2012): grow the batch when
  the variance of the mini-batch gradient exceeds ``eta^2 ||mean gradient||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _checks as C

__all__ = ["scale_lr", "scale_adam_hyperparameters", "scaling_rule", "AdaptiveBatchSize", "NormTestResult",
           "per_sample_grads"]


def scaling_rule(optimizer: Any) -> str:
    """"sqrt" for Adam-family optimizers (those with ``betas``), else "linear" (Granziol et al. 2022,
    arXiv 2006.09092)."""
    defaults = getattr(optimizer, "defaults", None)
    if not isinstance(defaults, dict):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return "sqrt" if "betas" in defaults else "linear"


def scale_lr(lr: float, *, base_batch_size: int, batch_size: int, rule: str = "linear",
             optimizer: Any = None) -> float:
    """The learning rate for ``batch_size`` given one tuned at ``base_batch_size``.

    ``rule="linear"`` (SGD; Goyal et al. 2017, arXiv 1706.02677): ``lr * k``; ``rule="sqrt"`` (Adam family;
    Malladi et al. 2022, arXiv 2205.10287; Granziol et al. 2022, arXiv 2006.09092): ``lr * sqrt(k)``, with
    ``k = batch_size / base_batch_size``; ``rule="auto"`` picks by ``optimizer`` (see :func:`scaling_rule`).
    """
    lr = C.real("lr", lr, 0.0)
    base = C.steps("base_batch_size", base_batch_size)
    new = C.steps("batch_size", batch_size)
    rule = C.choice("rule", rule, ("linear", "sqrt", "auto"))
    if rule == "auto":
        if optimizer is None:
            raise ValueError("optimizer: rule='auto' picks the rule from the optimizer; pass optimizer=opt "
                             "or rule='linear' / 'sqrt'")
        rule = scaling_rule(optimizer)
    k = new / base
    return lr * k if rule == "linear" else lr * math.sqrt(k)


def scale_adam_hyperparameters(*, lr: float, betas: tuple[float, float], eps: float, base_batch_size: int,
                               batch_size: int) -> dict[str, Any]:
    """Malladi et al.'s square-root scaling rule for Adam (arXiv 2205.10287, Definition 4.2) from batch
    ``B`` to ``k B``: ``lr * sqrt(k)``, ``1 - beta_i -> k (1 - beta_i)``, ``eps / sqrt(k)``.
    Returns ``{"lr", "betas", "eps"}``; raises if a scaled beta would leave [0, 1)."""
    lr = C.real("lr", lr, 0.0)
    eps = C.real("eps", eps, 0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = C.real("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
    b2 = C.real("betas[1]", betas[1], 0.0, 1.0, hi_open=True)
    k = C.steps("batch_size", batch_size) / C.steps("base_batch_size", base_batch_size)
    new_betas = (1.0 - k * (1.0 - b1), 1.0 - k * (1.0 - b2))
    for i, b in enumerate(new_betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}]: scaling the batch by {k:g} takes beta{i + 1}={betas[i]} to {b:g}, "
                             f"outside [0, 1); grow the batch by less than 1/(1 - beta{i + 1}) = "
                             f"{1.0 / (1.0 - betas[i]):g}")
    return {"lr": lr * math.sqrt(k), "betas": new_betas, "eps": eps / math.sqrt(k)}


@dataclass(frozen=True)
class NormTestResult:
    """One norm test (Byrd et al. 2012; Lau et al. 2024, arXiv 2402.11215): ``variance`` estimates
    E||g_B - grad||^2 for the current batch, ``threshold`` is ``eta^2 ||g_B||^2``; ``passed`` when
    variance <= threshold; ``suggested`` is ``ceil(b * variance / threshold)``, the smallest batch that
    would pass."""

    batch_size: int
    variance: float
    threshold: float
    passed: bool
    suggested: int


class AdaptiveBatchSize:
    """Adaptive batch size by the norm test of AdAdaGrad (Lau, Liu & Kolar 2024, arXiv 2402.11215).

    With per-sample gradients ``g_1 .. g_b`` of the current batch, mean ``g_B`` and sample variance
    ``s^2 = sum ||g_i - g_B||^2 / (b - 1)`` (the trace of the per-sample covariance), the test asks whether

        s^2 / b  <=  eta^2 ||g_B||^2        (the variance of the batch mean vs. its squared norm)

    and if not, the next batch size is ``ceil(s^2 / (eta^2 ||g_B||^2))``, clipped to ``max_batch_size``; the
    batch never shrinks (``monotone=True``, as in the paper's schemes). Smaller ``eta`` grows faster.

    Rows may also be means of equal micro-batches of ``samples_per_row`` samples each (e.g. the local
    gradients of data-parallel workers): ``s^2`` is then ``samples_per_row`` times their sample variance.
    Use it from a plain loop: ``bs = adaptive.update(per_sample_grads(model, loss_fn, x, y))`` and draw the next
    batch with ``bs`` samples; scale the learning rate with :func:`scale_lr` if the method needs it.
    """

    def __init__(self, batch_size: int, *, eta: float, max_batch_size: int | None = None,
                 monotone: bool = True) -> None:
        self.batch_size = C.steps("batch_size", batch_size)
        self.eta = C.real("eta", eta, 0.0, lo_open=True)
        self.max_batch_size = None if max_batch_size is None else C.steps("max_batch_size", max_batch_size)
        if self.max_batch_size is not None and self.max_batch_size < self.batch_size:
            raise ValueError(f"max_batch_size={self.max_batch_size} is below batch_size={self.batch_size}; "
                             f"pass max_batch_size >= batch_size")
        self.monotone = bool(monotone)
        self.history: list[int] = [self.batch_size]

    @staticmethod
    def _rows(grads: Tensor | Sequence[Any]) -> Tensor:
        if isinstance(grads, Tensor):
            rows = grads.detach()
            if rows.dim() < 2:
                raise ValueError(f"grads must have one row per sample (shape [b, ...]), got shape {tuple(grads.shape)}")
            return rows.reshape(rows.shape[0], -1).double()
        rows_list = []
        for r in grads:  # a list (one per sample) of lists of tensors (one per parameter)
            parts = [t.detach().reshape(-1).double() for t in (r if isinstance(r, (list, tuple)) else [r])]
            rows_list.append(torch.cat(parts))
        if not rows_list:
            raise ValueError("grads must hold at least 2 rows (per-sample gradients)")
        return torch.stack(rows_list)

    def test(self, grads: Tensor | Sequence[Any], *, samples_per_row: int = 1) -> NormTestResult:
        """Run the norm test on the rows of ``grads`` without changing the batch size."""
        rows = self._rows(grads)
        k = rows.shape[0]
        if k < 2:
            raise ValueError(f"grads must hold at least 2 rows to estimate a variance, got {k}")
        m = C.steps("samples_per_row", samples_per_row)
        mean = rows.mean(0)
        s2 = float(((rows - mean) ** 2).sum()) / (k - 1) * m  # per-sample variance (trace)
        b = k * m
        variance = s2 / b
        threshold = self.eta ** 2 * float((mean ** 2).sum())
        if threshold > 0:
            suggested = max(1, math.ceil(s2 / threshold))
        else:
            suggested = self.max_batch_size if self.max_batch_size is not None else 2 * b
        return NormTestResult(b, variance, threshold, variance <= threshold, suggested)

    def update(self, grads: Tensor | Sequence[Any], *, samples_per_row: int = 1) -> int:
        """Run the norm test and return the batch size to use next (also kept in ``batch_size``)."""
        result = self.test(grads, samples_per_row=samples_per_row)
        new = result.suggested
        if self.monotone:
            new = max(new, self.batch_size)
        if self.max_batch_size is not None:
            new = min(new, self.max_batch_size)
        self.batch_size = int(new)
        self.history.append(self.batch_size)
        return self.batch_size

    def state_dict(self) -> dict[str, Any]:
        """Plain state for checkpoints."""
        return {"batch_size": self.batch_size, "eta": self.eta, "max_batch_size": self.max_batch_size,
                "monotone": self.monotone, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.batch_size = int(state["batch_size"])
        self.eta = float(state["eta"])
        self.max_batch_size = state["max_batch_size"]
        self.monotone = bool(state["monotone"])
        self.history = list(state["history"])


def per_sample_grads(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
                     targets: Tensor) -> Tensor:
    """Per-sample gradients of ``loss_fn(model(x_i[None]), y_i[None])`` as a ``[b, n_params]`` tensor, the input
    of the norm test of Lau et al. 2024 (arXiv 2402.11215), over the trainable parameters, by
    ``torch.func.vmap`` of ``torch.func.grad`` (models whose forward mixes samples, e.g. BatchNorm in
    training mode, are not supported: use micro-batch means with ``samples_per_row``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.cat([grads[n].reshape(inputs.shape[0], -1) for n in names], dim=1)
