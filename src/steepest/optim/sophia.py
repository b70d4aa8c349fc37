"""Sophia (Liu et al. 2023): SophiaG (Gauss-Newton-Bartlett estimator) and SophiaH (Hutchinson estimator)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.registry import register
from .adahessian import HessianDiagonalOptimizer, _all_finite, ema_

__all__ = ["SophiaG", "SophiaH", "gnb_loss"]

_PAPER = ("Liu, Li, Hall, Liang, Ma 2023, Sophia: A Scalable Stochastic Second-order Optimizer for Language Model "
          "Pre-training")


def sophia_update(params, grads, exp_avg, hessian, *, lr, beta1, rho_bs, eps):
    """m <- b1 m + (1-b1) g; p <- p - lr sign(m) min(|m| / (rho bs max(h, 0) + eps), 1)."""
    mt.mul_(exp_avg, beta1)
    mt.add_(exp_avg, grads, alpha=1.0 - beta1)
    denom = list(torch._foreach_clamp_min(hessian, 0.0))
    mt.mul_(denom, rho_bs)
    mt.add_scalar_(denom, eps)
    ratio = mt.abs(exp_avg)
    mt.div_(ratio, denom)
    torch._foreach_clamp_max_(ratio, 1.0)
    mt.addcmul_(params, mt.sign(exp_avg), ratio, -lr)


def gnb_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sophia's Gauss-Newton-Bartlett loss: the mean cross-entropy of ``logits`` (..., classes) on labels sampled
    from softmax(logits), as the authors' training loop (torch.distributions.Categorical(logits=...).sample()).

    Its gradient g_hat satisfies B E[g_hat * g_hat] = diag(GN) of the mean loss over the B sampled labels:
    feed it to :meth:`SophiaG.update_hessian` and step with ``bs=B``.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        probs = torch.softmax(flat.detach().float(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, labels)


_SOPHIA_CHECKS = {"lr": checks.nonnegative, "betas": checks.betas(2), "rho": checks.nonnegative,
                  "weight_decay": checks.nonnegative, "eps": checks.positive, "bs": checks.positive,
                  "hessian_interval": checks.integer(1)}
_SOPHIA_SPACE = {"lr": ("log", 1e-5, 1e-2), "rho": ("log", 1e-3, 1.0), "weight_decay": ("log", 5e-3, 1.0)}


class _SophiaMixin:
    """The update shared by SophiaG and SophiaH (the authors' _single_tensor_sophiag)."""

    weight_decay_mode = "decoupled"
    update = staticmethod(sophia_update)
    _step_bs: float | None = None

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "hessian": self.zeros_state(p)}

    def scalars(self, group, step):
        beta1, _ = group["betas"]
        bs = self._step_bs if self._step_bs is not None else group["bs"]
        return dict(lr=self.lr(group), beta1=beta1, rho_bs=group["rho"] * bs, eps=group["eps"])


@register("sophiag", family="curvature", paper=_PAPER, arxiv="2305.14342",
          reference="Liuhong99/Sophia (sophia.py, SophiaG); float64 transcription in the tests",
          state_words=2, needs=("sampled-labels",), example_kwargs={"lr": 1e-2, "weight_decay": 1e-2},
          search_space=_SOPHIA_SPACE)
class SophiaG(_SophiaMixin, Optimizer):
    """SophiaG (Liu, Li, Hall, Liang, Ma 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
    Model Pre-training", ICLR 2024, arXiv 2305.14342), as the authors' sophia.py (Liuhong99/Sophia)::

        every k steps (the caller):  h <- b2 h + (1-b2) g_hat * g_hat   (update_hessian; g_hat the gradient of the
                                                                         loss on labels sampled from the model)
        every step:  p <- p (1 - lr wd)
                     m <- b1 m + (1-b1) g
                     p <- p - lr sign(m) min(|m| / (rho bs h + eps), 1)

    bs is the number of sampled labels (tokens) the Gauss-Newton-Bartlett loss averages over, so that bs h
    estimates the Gauss-Newton diagonal of the mean loss; the authors pass it to every ``step(bs=...)``. Here it
    is a hyperparameter (``bs``, default the authors' 5120) that ``step(closure, bs=...)`` can override for one
    step. No bias correction of m (the authors' code). lr is the paper's rho * eta (the README).
    Defaults (the authors'): lr 1e-4, betas (0.965, 0.99), rho 0.04, weight_decay 0.1 (decoupled), eps 1e-15,
    bs 5120, hessian_interval 10. State: exp_avg, hessian (2 words).

    The training loop (as the authors'; ``gnb_loss`` samples the labels)::

        loss = f(model(x), y); loss.backward(); opt.step(bs=B); opt.zero_grad()
        if opt.hessian_due():                      # after steps k, 2k, ...
            opt.update_hessian_gnb(model(x))       # or gnb_loss(logits).backward(); opt.update_hessian(); zero_grad

    Until the first update_hessian h = 0 and the step is lr sign(m) (as the authors' first k steps). A non-finite
    estimate is skipped with a RuntimeWarning (h kept; ``skipped_hessian_updates`` counts it).

    Differences from the authors' code: h is clipped at 0 in the denominator (a no-op for the non-negative GNB
    estimate, there to share the update with SophiaH); the step count is an int kept per parameter; the update
    runs in the engine's for-each/fused kernels; ``update_hessian`` can take the gradients as a list.
    """

    hyperparams = _SOPHIA_CHECKS

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, eps=1e-15, bs=5120,
                 hessian_interval=10, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, rho=rho,
                        weight_decay=weight_decay, eps=eps, bs=bs, hessian_interval=hessian_interval,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)
        self.skipped_hessian_updates = 0

    @torch.no_grad()
    def step(self, closure=None, bs: float | None = None):
        """One step; ``bs`` (optional) overrides the group's ``bs`` for this step, as the authors' step(bs=...)."""
        if bs is not None:
            checks.positive("bs", bs)
        self._step_bs = bs
        try:
            return super().step(closure)
        finally:
            self._step_bs = None

    def hessian_due(self) -> bool:
        """True after steps k, 2k, 3k, ... (k = hessian_interval of the first group): the authors' loop feeds a
        new estimate then (iter_num % k == k - 1, after the step)."""
        k = self.param_groups[0]["hessian_interval"]
        steps = [s["step"] for s in self.state.values() if "step" in s]
        return bool(steps) and max(steps) % k == 0 and max(steps) > 0

    @torch.no_grad()
    def update_hessian(self, grads: Sequence[Tensor | None] | None = None) -> bool:
        """h <- b2 h + (1-b2) g * g for every parameter with a gradient (the authors' update_hessian).

        ``grads``: the gradients of the loss on sampled labels, one per parameter in param-group order (None to
        skip one); default each ``p.grad``. Returns False (and warns) when the estimate is not finite: then
        nothing changes.
        """
        plist = [p for group in self.param_groups for p in group["params"]]
        if grads is None:
            grads = [p.grad for p in plist]
        else:
            grads = list(grads)
            if len(grads) != len(plist):
                raise ValueError(f"SophiaG.update_hessian: got {len(grads)} gradients for {len(plist)} parameters "
                                 f"(one per parameter in param-group order, None to skip)")
        todo = []
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                g = grads[i]
                i += 1
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients")
                if g.shape != p.shape:
                    raise RuntimeError(f"SophiaG.update_hessian: gradient {i - 1} has shape {tuple(g.shape)}, its "
                                       f"parameter {tuple(p.shape)}")
                todo.append((group, p, g.detach()))
        if not todo:
            return True
        sq = [torch.view_as_real(g * g.conj()) if g.is_complex() else g * g for _, _, g in todo]
        if not _all_finite(sq):
            self.skipped_hessian_updates += 1
            warnings.warn("SophiaG: the Hessian estimate (squared sampled-label gradient) has non-finite entries; "
                          "this Hessian update was skipped and the previous estimate kept", RuntimeWarning,
                          stacklevel=2)
            return False
        for group, p, g in todo:
            state = self._state_of(p, group)
            h = state["hessian"]
            if p.is_complex():
                h, g = torch.view_as_real(h), torch.view_as_real(g)
            _, beta2 = group["betas"]
            if h.dtype == g.dtype:
                h.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            else:
                ema_([h], [g.float() * g.float()], beta2, self.stochastic_rounding)
        return True

    def update_hessian_gnb(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample labels from ``logits``, take the gradient of their mean cross-entropy (``gnb_loss``) without
        touching ``p.grad``, and feed it to :meth:`update_hessian`. Returns the sampled-label loss (detached).
        Step with ``bs`` = the number of sampled labels (``logits.numel() // logits.shape[-1]``)."""
        plist = [p for group in self.param_groups for p in group["params"]]
        with torch.enable_grad():
            loss = gnb_loss(logits, generator)
            live = [p for p in plist if p.requires_grad]
            got = torch.autograd.grad(loss, live, allow_unused=True)
        by_param = dict(zip(live, got))
        self.update_hessian([by_param.get(p) for p in plist])
        return loss.detach()


@register("sophiah", family="curvature", paper=_PAPER, arxiv="2305.14342",
          reference="paper Algorithm 3 with the Hutchinson estimator and the update of Liuhong99/Sophia's sophia.py; "
                    "float64 transcription in the tests",
          state_words=2, needs=("closure", "hvp"),
          example_kwargs={"lr": 1e-2, "rho": 0.05, "weight_decay": 1e-2, "hessian_interval": 2},
          conformance_skip={
              "maximize": "the check sets gradients by hand, which carry no graph for the Hessian-vector product; "
                          "tests/optim/test_sophia.py checks maximize=True on -loss against minimizing loss",
              "complex": "the check sets gradients by hand (no graph for the Hessian-vector product), and complex "
                         "parameters are rejected: the Rademacher probes are real",
          },
          search_space=_SOPHIA_SPACE)
class SophiaH(_SophiaMixin, HessianDiagonalOptimizer):
    """SophiaH (Liu, Li, Hall, Liang, Ma 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
    Model Pre-training", ICLR 2024, arXiv 2305.14342): Sophia with Hutchinson's estimator, computed inside
    ``step`` from the closure's graph (the closure calls ``loss.backward(create_graph=True)``)::

        at steps 1, 1+k, 1+2k, ...:  h <- b2 h + (1-b2) z * (H z)    (z Rademacher, one probe per tensor;
                                                                      the paper's Algorithm 3, "t mod k = 1")
        every step:  p <- p (1 - lr wd)
                     m <- b1 m + (1-b1) g
                     p <- p - lr sign(m) min(|m| / (rho bs max(h, 0) + eps), 1)

    The update is the authors' SophiaG update (sophia.py), with h clipped at 0 in the denominator (Hutchinson
    estimates can be negative; the authors' early SophiaH code did the same with relu(h)): negative-curvature
    coordinates take the clipped step lr sign(m). The estimate is of the Hessian of the (mean) loss itself,
    so ``bs`` defaults to 1 (SophiaG's bs rescales a squared gradient; here it only rescales rho). With
    ``maximize=True`` the estimate is negated (the curvature of -loss).
    Defaults: lr 1e-4, betas (0.965, 0.99), rho 0.04, weight_decay 0.1 (decoupled), eps 1e-15 (the authors'
    SophiaG), bs 1, hessian_interval 10 (the paper), seed 0. State: exp_avg, hessian (2 words).

    The closure needs the graph only on the steps that refresh h: ``loss.backward(create_graph=
    opt.create_graph_due())`` skips the double-backward cost on the other k - 1 of every k steps.

    Bad input: no closure -> ValueError; gradients without a graph on a step that refreshes h -> RuntimeError
    naming ``create_graph=True`` (an all-zero gradient passes with a zero estimate); a non-finite estimate ->
    RuntimeWarning, that Hessian update is skipped and h kept (``skipped_hessian_updates``).

    Differences: the authors' repository has only SophiaG now (an early SophiaH was removed); this class keeps
    SophiaG's update (no bias correction of m, eps 1e-15) and the paper's schedule, which also refreshes h at
    step 1 (the authors' SophiaG loop first feeds h after step k). Probes come from a generator seeded per
    (seed, step, parameter index); ``p.grad`` is replaced by its detached value once the product is taken.
    """

    hyperparams = {**_SOPHIA_CHECKS, "seed": checks.integer(0)}

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, eps=1e-15, bs=1,
                 hessian_interval=10, seed=0, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, rho=rho,
                        weight_decay=weight_decay, eps=eps, bs=bs, hessian_interval=hessian_interval, seed=seed,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    def _transform_estimate(self, zhz: Tensor, p: Tensor, group: dict[str, Any]) -> Tensor:
        return -zhz if group["maximize"] else zhz

    def _apply_estimate(self, p, group, est):
        _, beta2 = group["betas"]
        h = self.state[p]["hessian"]
        if h.dtype == est.dtype:
            h.mul_(beta2).add_(est, alpha=1.0 - beta2)
        else:
            ema_([h], [est], beta2, self.stochastic_rounding)
