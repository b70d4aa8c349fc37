"""AdaHessian (Yao et al. 2021), and the Hutchinson machinery shared with SophiaH (optim/sophia.py)."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer
from ..core.precision import working_copy, write_back_
from ..core.registry import register
from ..curvature.operators import double_backward_attention

__all__ = ["AdaHessian", "HessianDiagonalOptimizer", "hutchinson_diagonal", "probe_seed", "rademacher_probe"]

_MASK64 = (1 << 64) - 1


def probe_seed(seed: int, step: int, index: int) -> int:
    """The generator seed of the probe of parameter ``index`` at step ``step`` (a splitmix64 mix, 63 bits).

    Deriving each probe's seed from (seed, step, index) makes the probe sequence a pure function of the
    optimizer's hyperparameters and step counts: a state_dict round trip continues bit for bit, and a
    test oracle can draw the very probes the optimizer draws (:func:`rademacher_probe`).
    """
    x = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9 + (index + 1) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def rademacher_probe(like: Tensor, *, seed: int, step: int, index: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """A Rademacher probe (entries +-1 with probability 1/2) shaped like ``like``, drawn from a generator seeded
    with :func:`probe_seed`; the same signs whatever ``like``'s dtype."""
    gen = generator if generator is not None else torch.Generator(device=like.device)
    gen.manual_seed(probe_seed(seed, step, index))
    z = torch.randint(0, 2, like.shape, generator=gen, device=like.device, dtype=torch.int8)
    return (z * 2 - 1).to(like.dtype)


def hutchinson_diagonal(grads: Sequence[Tensor], params: Sequence[Tensor], probes: Sequence[Tensor], *,
                        retain_graph: bool = False) -> list[Tensor]:
    """Hutchinson's diagonal estimate z * (H z) per parameter (Bekas et al. 2007; AdaHessian, arXiv 2006.00719).

    ``grads`` are the gradients of a loss taken with ``create_graph=True``; ``probes`` Rademacher vectors shaped
    like ``params``. Returns z_i * (H z)_i for each parameter, H the Hessian of the loss in these parameters:
    an unbiased estimate of diag(H) (E[z z^T] = I), exact for every probe when H is diagonal. Gradients that
    carry no graph (the loss is linear in that parameter) contribute nothing; a parameter the graph does not
    reach gets zeros.
    """
    outs = [(g, z) for g, z in zip(grads, probes) if g.requires_grad]
    if not outs:
        raise RuntimeError("hutchinson_diagonal: no gradient carries an autograd graph; take the gradient with "
                           "loss.backward(create_graph=True) or torch.autograd.grad(..., create_graph=True)")
    with torch.enable_grad():
        hz = torch.autograd.grad([g for g, _ in outs], list(params), grad_outputs=[z for _, z in outs],
                                 retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() * z for h, z, p in zip(hz, probes, params)]


class HessianDiagonalOptimizer(Optimizer):
    """Base of optimizers that refresh a Hutchinson estimate of the Hessian diagonal inside ``step``.

    ``step(closure)`` runs the closure (which must call ``loss.backward(create_graph=True)``), checks the
    gradients, and on the steps where a parameter's estimate is due (``hessian_due``) draws a Rademacher probe
    per parameter (seeded from (group seed, the parameter's step, its index in the optimizer)), takes one
    Hessian-vector product over all those parameters, and hands ``z * (H z)`` to ``_transform_estimate`` and
    ``_apply_estimate`` before the engine's update runs. The gradients' graphs are released (``p.grad`` is
    replaced by its detached value) once the product is taken.

    Non-finite estimates: the whole Hessian update of that step is skipped (``skipped_hessian_updates`` counts
    it) with a RuntimeWarning, and the previous estimate is kept; if a parameter has no previous estimate and
    the method cannot step without one (``_needs_prior_estimate``), the whole step is skipped instead (nothing
    changes; ``skipped_steps`` counts it).
    """

    needs_closure = True
    needs_graph = True
    _needs_prior_estimate = False
    _transient = ("_probe_generators",)

    def __init__(self, params, defaults, **engine):
        super().__init__(params, defaults, **engine)
        self.skipped_hessian_updates = 0

    # --------------------------------------------------------------------------- what subclasses give
    def hessian_due(self, group: dict[str, Any], step: int) -> bool:
        """Whether the estimate is refreshed at ``step`` (1-based): steps 1, 1 + k, 1 + 2k, ... for
        k = group['hessian_interval']."""
        return (step - 1) % group["hessian_interval"] == 0

    def _transform_estimate(self, zhz: Tensor, p: Tensor, group: dict[str, Any]) -> Tensor:
        return zhz

    def _apply_estimate(self, p: Tensor, group: dict[str, Any], est: Tensor) -> None:
        raise NotImplementedError

    def create_graph_due(self) -> bool:
        """Whether the next ``step`` takes a Hessian-vector product, i.e. needs the closure's gradients with a
        graph. With a ``hessian_interval`` above 1 the closure can skip the cost of the double-backward graph
        in between: ``loss.backward(create_graph=opt.create_graph_due())``."""
        # Parameters that never had a gradient (unused, frozen) have no step count and are left out.
        stepped = [(group, self.state[p]["step"]) for group in self.param_groups for p in group["params"]
                   if self.state.get(p)]
        if not stepped:
            return any(self.hessian_due(group, 1) for group in self.param_groups)
        return any(self.hessian_due(group, step + 1) for group, step in stepped)

    # ------------------------------------------------------------------------------------ plumbing
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group.get("params", []) if isinstance(param_group, dict) else []
        plist = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(plist):
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(f"{type(self).__name__}: parameter {i} is complex; Hutchinson probes here are "
                                 f"real: optimize torch.view_as_real(p) instead")
        if not isinstance(params, Tensor):
            param_group = {**param_group, "params": plist}
        super().add_param_group(param_group)

    def _generator(self, device: torch.device) -> torch.Generator:
        gens = self.__dict__.setdefault("_probe_generators", {})
        if device not in gens:
            gens[device] = torch.Generator(device=device)
        return gens[device]

    def _missing_closure_error(self) -> ValueError:
        name = type(self).__name__
        return ValueError(
            f"{name}.step needs a closure that re-evaluates the loss and calls loss.backward(create_graph=True), "
            f"e.g. def closure(): opt.zero_grad(); loss = f(); loss.backward(create_graph=True); return loss; "
            f"then opt.step(closure)")

    def _missing_graph_error(self) -> RuntimeError:
        name = type(self).__name__
        return RuntimeError(
            f"{name}: the gradients carry no autograd graph, so no Hessian-vector product can be taken. Call "
            f"loss.backward(create_graph=True) in the closure (or set p.grad from torch.autograd.grad(..., "
            f"create_graph=True)). If the loss is linear in every parameter its Hessian is zero and {name} "
            f"does not apply.")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; ``closure`` re-evaluates the loss and calls ``loss.backward(create_graph=True)``."""
        if closure is None:
            raise self._missing_closure_error()
        with double_backward_attention():
            loss = self.call_closure(closure)
        work = self._collect()
        if not work:
            return loss
        if self.skip_nonfinite and not self._grads_finite(work):
            self.skipped_steps += 1
            self._release_graphs(work)
            return loss
        try:
            estimates = self._estimates(work)
        finally:
            self._release_graphs(work)
        if estimates is None:
            self.skipped_steps += 1
            return loss
        for group, params in work:
            for p in params:
                self._state_of(p, group)
                if p in estimates:
                    self._apply_estimate(p, group, estimates[p])
            self._step_group(group, params)
        return loss

    @staticmethod
    def _release_graphs(work) -> None:
        for _, params in work:
            for p in params:
                if p.grad.requires_grad:
                    p.grad = p.grad.detach()

    def _estimates(self, work) -> dict[Tensor, Tensor] | None:
        """The transformed estimates of the parameters due now; {} if none is due or the estimate is not finite
        (kept the old one), None if the step must be skipped."""
        index = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(p, len(index))
        due = []
        for group, params in work:
            for p in params:
                state = self.state[p]
                step = (state["step"] if state else 0) + 1
                if self.hessian_due(group, step):
                    due.append((group, p, step))
        if not due:
            return {}
        grads = [p.grad for _, p, _ in due]
        if not any(g.requires_grad for g in grads):
            # Hand-set gradients or a forgotten create_graph. An all-zero gradient (nothing to precondition, e.g.
            # a masked or warm-up step) is let through with a zero curvature estimate.
            if any(bool(g.any()) for g in grads if g.numel()):
                raise self._missing_graph_error()
            zhz = [torch.zeros_like(p) for _, p, _ in due]
        else:
            probes = [rademacher_probe(p, seed=group["seed"], step=step, index=index[p],
                                       generator=self._generator(p.device)) for group, p, step in due]
            zhz = hutchinson_diagonal(grads, [p for _, p, _ in due], probes)
        ests = [self._transform_estimate(e, p, group) for e, (group, p, _) in zip(zhz, due)]
        if _all_finite(ests):
            return {p: e for e, (_, p, _) in zip(ests, due)}
        self.skipped_hessian_updates += 1
        name = type(self).__name__
        if self._needs_prior_estimate and any(not self.state[p] for _, p, _ in due):
            warnings.warn(f"{name}: the Hessian estimate has non-finite entries and some parameter has no earlier "
                          f"estimate to fall back on; the whole step was skipped (parameters and state unchanged)",
                          RuntimeWarning, stacklevel=3)
            return None
        warnings.warn(f"{name}: the Hessian estimate has non-finite entries; this Hessian update was skipped and "
                      f"the previous estimate kept", RuntimeWarning, stacklevel=3)
        return {}


def _all_finite(ts: Sequence[Tensor]) -> bool:
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for t in ts:
        if t.numel():
            by_device[t.device].append(t.isfinite().all())
    return all(bool(torch.stack(v).all()) for v in by_device.values())


def _pow_(xs, k):
    if isinstance(k, Tensor):
        for x in xs:
            x.pow_(k)
    else:
        torch._foreach_pow_(xs, k)


def adahessian_update(params, grads, exp_avg, exp_hessian_diag_sq, hessian, *, lr, beta1, beta2, eps,
                      bias_correction1, bias_correction2_pow, hessian_power, powered=False):
    """m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) D^2; p <- p - lr/bc1 * m / (sqrt(v)^k / sqrt(bc2)^k + eps)."""
    mt.mul_(exp_avg, beta1)
    mt.add_(exp_avg, grads, alpha=1.0 - beta1)
    mt.mul_(exp_hessian_diag_sq, beta2)
    mt.addcmul_(exp_hessian_diag_sq, hessian, hessian, 1.0 - beta2)
    denom = mt.sqrt(exp_hessian_diag_sq)
    if powered:
        _pow_(denom, hessian_power)
    mt.div_(denom, bias_correction2_pow)
    mt.add_scalar_(denom, eps)
    mt.addcdiv_(params, exp_avg, denom, -lr / bias_correction1)


@register("adahessian", family="curvature",
          paper="Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney 2021, ADAHESSIAN: An Adaptive Second Order Optimizer "
                "for Machine Learning",
          arxiv="2006.00719",
          reference="amirgholami/adahessian (image_classification/optim_adahessian.py); float64 transcription in the "
                    "tests; dense torch.func.hessian diagonal for the estimator",
          state_words=3, needs=("closure", "hvp"),
          example_kwargs={"lr": 0.1, "weight_decay": 1e-2},
          conformance_skip={
              "maximize": "the check sets gradients by hand, which carry no graph for the Hessian-vector product; "
                          "tests/optim/test_adahessian.py checks maximize=True on -loss against minimizing loss",
              "complex": "the check sets gradients by hand (no graph for the Hessian-vector product), and complex "
                         "parameters are rejected: the Rademacher probes are real",
          },
          search_space={"lr": ("log", 1e-3, 1.0), "one_minus_beta1": ("log", 4e-3, 0.1),
                        "weight_decay": ("log", 5e-3, 1.0)})
class AdaHessian(HessianDiagonalOptimizer):
    """AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney 2021, "ADAHESSIAN: An Adaptive Second Order
    Optimizer for Machine Learning", AAAI 2021, arXiv 2006.00719), as the authors' image-classification code
    (amirgholami/adahessian, image_classification/optim_adahessian.py).

    At step t, with a Rademacher probe z (one per parameter tensor, one Hessian-vector product over all)::

        D_t = |z * (H z)| = |H z|                    (refreshed every ``hessian_interval`` steps, else reused)
        D_t <- mean of D_t over dims (2, 3)          (4-D conv kernels, ``spatial_average=True``)
        m_t = b1 m + (1-b1) g                        (exp_avg)
        v_t = b2 v + (1-b2) D_t^2                    (exp_hessian_diag_sq)
        p  <- p - lr (m_t/(1-b1^t) / (sqrt(v_t)^k / sqrt(1-b2^t)^k + eps) + wd p)

    k is ``hessian_power``; eps sits outside the power, added after the bias correction, as the authors' code.
    Weight decay is decoupled, as the authors' ``lr * wd * p`` term (applied to the pre-step p).
    Defaults (the authors'): lr 0.15, betas (0.9, 0.999), eps 1e-4, weight_decay 0, hessian_power 1;
    hessian_interval 1, spatial_average True, seed 0.
    State: exp_avg, exp_hessian_diag_sq and the last estimate D ("hessian") (3 words).

    Usage: ``def closure(): opt.zero_grad(); loss = f(); loss.backward(create_graph=True); return loss`` and
    ``opt.step(closure)``. The step replaces each ``p.grad`` by its detached value once the Hessian-vector
    product is taken (frees the graph and the parameter-gradient reference cycle of ``create_graph``). With
    ``hessian_interval`` k > 1, ``loss.backward(create_graph=opt.create_graph_due())`` builds the
    double-backward graph only on the steps that refresh the estimate.

    Bad input: no closure -> ValueError; gradients without a graph -> RuntimeError naming
    ``create_graph=True`` (an all-zero gradient passes with a zero estimate); a non-finite Hessian estimate ->
    RuntimeWarning, that Hessian update is skipped and the previous D kept (the whole step is skipped when a
    parameter has no previous D: dividing by eps alone would take a wild step).

    Differences from the authors' code: probes come from a generator seeded per (seed, step, parameter index)
    instead of the global RNG (reproducible, state_dict round trips continue bit for bit); the estimate can be
    refreshed every ``hessian_interval`` steps, reusing the last D in between (as the ``update_each`` of the
    ada-hessian package; the authors refresh every step, the default); 3-D and 5-D kernels are taken
    elementwise (the authors' code handles only <= 2-D and 4-D tensors); the moments run in the engine's
    for-each/fused kernels and weight decay is applied as p (1 - lr wd) before the update (equal up to
    rounding); the state keeps D as a third buffer.
    """

    hyperparams = {"lr": checks.nonnegative, "betas": checks.betas(2), "eps": checks.positive,
                   "weight_decay": checks.nonnegative, "hessian_power": checks.probability,
                   "hessian_interval": checks.integer(1), "spatial_average": checks.boolean,
                   "seed": checks.integer(0)}
    weight_decay_mode = "decoupled"
    update = staticmethod(adahessian_update)
    _needs_prior_estimate = True

    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0,
                 hessian_interval=1, spatial_average=True, seed=0, *, maximize=False, **engine):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, hessian_power=hessian_power, hessian_interval=hessian_interval,
                        spatial_average=spatial_average, seed=seed, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def init_state(self, p, group):
        return {"exp_avg": self.zeros_state(p), "exp_hessian_diag_sq": self.zeros_state(p),
                "hessian": self.zeros_state(p)}

    def scalars(self, group, step):
        beta1, beta2 = group["betas"]
        k = float(group["hessian_power"])
        return dict(lr=self.lr(group), beta1=beta1, beta2=beta2, eps=group["eps"],
                    bias_correction1=1.0 - beta1**step, bias_correction2_pow=math.sqrt(1.0 - beta2**step) ** k,
                    hessian_power=k)

    def static_options(self, group):
        return {"powered": float(group["hessian_power"]) != 1.0}

    def _transform_estimate(self, zhz, p, group):
        d = zhz.abs()
        if group["spatial_average"] and d.dim() == 4:
            d = d.mean(dim=(2, 3), keepdim=True).expand_as(d)
        return d

    def _apply_estimate(self, p, group, est):
        self.state[p]["hessian"].copy_(est)


def ema_(buffers: Sequence[Tensor], values: Sequence[Tensor], beta: float, stochastic: bool) -> None:
    """buffer <- beta * buffer + (1 - beta) * value, in float32 for 16-bit buffers (written back as the engine)."""
    for b, v in zip(buffers, values):
        w = working_copy(b)
        w.mul_(beta).add_(v.to(w.dtype), alpha=1.0 - beta)
        write_back_(b, w, stochastic)
