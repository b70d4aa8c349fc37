"""SCALE: column-normalised SGD with momentum on the last layer only, and AdamW for vector params."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer, _apply_update
from ..core.registry import register
from .muon import fallback_lr, matrix_shape, output_head, record_initial_lr


def column_normalize(d: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """d (viewed as (shape[0], -1)) divided by the RMS of each slice along ``dim``, clamped below at eps.

    dim=1 (a torch weight (out, in)): one RMS per output unit, over its inputs — the paper's "column"
    of W in y = x W. dim=0: one per input coordinate (the authors use it for the token embedding).
    """
    m = d.reshape(matrix_shape(d.shape))
    s = torch.sqrt(torch.mean(torch.square(m), dim=dim, keepdim=True)).clamp_min_(eps)
    return (m / s).reshape(d.shape)


def scale_update(params, grads, momentum_buffer=None, *, lr, momentum, eps, dim=1):
    """m <- lerp(m, g, 1 - beta) (last layer only; else d = g); p <- p - lr * column_normalize(d)."""
    if momentum_buffer is not None:
        mt.lerp_(momentum_buffer, grads, 1.0 - momentum)
        grads = momentum_buffer
    for p, d in zip(params, grads):
        if p.numel() > 0:
            p.add_(column_normalize(d, dim, eps), alpha=-lr)


def scale_adam_update(params, grads, exp_avg, exp_avg_sq, *, beta1, beta2, eps, step_size):
    """The authors' AdamW for vector params: p <- p - step_size * m / (sqrt(v) + eps),
    step_size = lr sqrt(1 - b2^t) / (1 - b1^t) (eps is not bias-corrected)."""
    mt.lerp_(exp_avg, grads, 1.0 - beta1)
    mt.lerp_(exp_avg_sq, [g * g for g in grads], 1.0 - beta2)
    denom = mt.sqrt(exp_avg_sq)
    mt.add_scalar_(denom, eps)
    mt.addcdiv_(params, exp_avg, denom, -step_size)


def scale_param_groups(model: torch.nn.Module, head: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """Param groups for :class:`SCALE` the authors' way: the output head (``head``, default the module named
    ``lm_head``, else the last nn.Linear) gets ``last_layer=True`` (momentum); nn.Embedding weights get
    ``embedding=True`` (normalised along dim 0); other params keep the defaults (matrices: column-normalised
    SGD; ndim < 2: AdamW). Tied weights are listed once. Empty groups are left out."""
    head = output_head(model) if head is None else head
    role: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            role[id(module.weight)] = "embedding"
    if head is not None:
        role.update({id(p): "last_layer" for p in head.parameters() if p.ndim >= 2})
    groups: dict[str, list[Tensor]] = {"last_layer": [], "embedding": [], "rest": []}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        groups[role.get(id(p), "rest")].append(p)
    out = []
    if groups["rest"]:
        out.append({"params": groups["rest"]})
    if groups["embedding"]:
        out.append({"params": groups["embedding"], "embedding": True})
    if groups["last_layer"]:
        out.append({"params": groups["last_layer"], "last_layer": True})
    return out


def _optional_nonnegative(name: str, value: Any) -> None:
    """None, or a real number >= 0."""
    if value is not None:
        checks.nonnegative(name, value)


_optional_nonnegative.bad_example = -1.0


@register("scale", family="matrix", paper="Glentis, Li, Han & Hong 2025, A Minimalist Optimizer Design for LLM "
          "Pretraining (SCALE)", arxiv="2506.16659",
          reference="OptimAI-Lab/Minimalist_LLM_Pretraining (scale_optimizer.py); float64 NumPy transcription",
          state_words=0, needs=("matrix-params",), example_kwargs={"lr": 1e-2, "last_layer": True},
          search_space={"lr": ("log", 1e-4, 3e-2), "one_minus_momentum": ("log", 0.01, 0.3)})
class SCALE(Optimizer):
    """SCALE, Stochastic Column-normAlized Last-layer momEntum (Glentis, Li, Han & Hong 2025, "A Minimalist
    Optimizer Design for LLM Pretraining", arXiv 2506.16659; authors' code OptimAI-Lab/Minimalist_LLM_Pretraining).

    For a matrix param W (ndim >= 2, viewed as (shape[0], prod(shape[1:]))) with gradient G:

        d = lerp(m, G, 1 - beta) -> m  in groups with last_layer=True (the output layer), else d = G
        u[i, :] = d[i, :] / max(rms(d[i, :]), eps)    (embedding=True: u[:, j] = d[:, j] / max(rms(d[:, j]), eps))
        W <- W (1 - lr wd) - lr u

    The normalisation is per output unit of a torch weight (out, in), over its inputs: the paper's column-wise
    normalisation of W in y = x W. As the authors' code it divides by the RMS, not the L2 norm, so every
    normalised column has unit RMS, and the token embedding (vocab, d) is normalised along dim 0.
    Params with ndim < 2 use the authors' AdamW: m <- lerp(m, g, 1-b1), v <- lerp(v, g^2, 1-b2),
    p <- p (1 - lr_a wd) - lr_a sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + adamw_eps), with lr_a = lr when
    ``adamw_lr`` is None, else adamw_lr scaled as lr is scaled from its initial value (the authors' rule
    adam_lr * lr / max_lr, which makes schedules reach it). :func:`scale_param_groups` builds the groups.

    Defaults: lr 1e-3 (the authors' scripts; their class default is 1e-4), momentum 0.9, weight_decay 0
    (decoupled, for every param as the authors), eps 1e-8; AdamW: betas (0.9, 0.999), eps 1e-8.
    State: momentum_buffer for last-layer matrices only (1 word there, none for other matrices: ~0 words per
    parameter in an LLM), exp_avg and exp_avg_sq for vector params.

    Differences from the authors' code: which layers are "last" and "embedding" is said by param-group flags
    (the authors match module names: attn, mlp, embed_tokens); complex params are treated as their real view
    (the RMS then runs over real and imaginary parts).
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "weight_decay": checks.nonnegative,
                   "eps": checks.positive, "last_layer": checks.boolean, "embedding": checks.boolean,
                   "adamw_lr": _optional_nonnegative, "adamw_betas": checks.betas(2),
                   "adamw_eps": checks.positive}
    weight_decay_mode = "custom"
    elementwise = False
    per_tensor = False
    fusable = False  # per-row reductions and two code paths: the eager path is the one
    update = staticmethod(scale_update)

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, eps=1e-8, last_layer=False,
                 embedding=False, adamw_lr=None, adamw_betas=(0.9, 0.999), adamw_eps=1e-8, *, maximize=False,
                 **engine):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, last_layer=last_layer,
                        embedding=embedding, adamw_lr=adamw_lr,
                        adamw_betas=tuple(adamw_betas) if isinstance(adamw_betas, list) else adamw_betas,
                        adamw_eps=adamw_eps, maximize=maximize)
        super().__init__(params, defaults, **engine)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its options; nothing is added if one is invalid."""
        super().add_param_group(param_group)
        record_initial_lr(self.param_groups[-1])

    def init_state(self, p, group):
        if p.ndim < 2:
            return {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}
        return {"momentum_buffer": self.zeros_state(p)} if group["last_layer"] else {}

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for matrix, step, bucket in self._counted_by_kind(group, params, lambda p: p.ndim >= 2):
            self._run(group, bucket, matrix, step)

    def _run(self, group: dict[str, Any], params: list[Tensor], matrix: bool, step: int) -> None:
        names = [k for k in self.state[params[0]] if k != "step"]
        grads = [p.grad for p in params]
        states = {k: [self.state[p][k] for p in params] for k in names}
        if params[0].is_complex():
            params, grads = [torch.view_as_real(p) for p in params], [torch.view_as_real(g) for g in grads]
            states = {k: [torch.view_as_real(s) for s in v] for k, v in states.items()}
        lr = self.lr(group)
        if matrix:
            update, static = scale_update, {"dim": 0 if group["embedding"] else 1}
            scalars = dict(lr=lr, momentum=group["momentum"], eps=group["eps"])
        else:
            lr = fallback_lr(group, "adamw_lr", lr)
            beta1, beta2 = group["adamw_betas"]
            update, static = scale_adam_update, {}
            scalars = dict(beta1=beta1, beta2=beta2, eps=group["adamw_eps"],
                           step_size=lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step))
        wd = 1.0 - lr * group["weight_decay"]
        _apply_update(update, params, grads, states, scalars, wd, static=static, maximize=bool(group["maximize"]),
                      wd_mode="decoupled" if wd != 1.0 else None, stochastic=self.stochastic_rounding)
