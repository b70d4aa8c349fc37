"""Muon: momentum orthogonalised by a Newton-Schulz iteration, with a built-in AdamW for non-matrix params."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core import checks
from ..core import multitensor as mt
from ..core.base import Optimizer, _apply_update
from ..core.registry import register
from .adam import adam_scalars, adam_update

# The authors' quintic coefficients (KellerJordan/Muon, muon.py): chosen to maximise the slope at zero.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_NS_DTYPES = (None, torch.bfloat16, torch.float16, torch.float32, torch.float64)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The 2D view a matrix method takes of a parameter: (rows, product of the other dims)."""
    return (shape[0], math.prod(shape[1:]))


def newton_schulz(G: Tensor, steps: int = 5, *, dtype: torch.dtype | None = torch.bfloat16, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> Tensor:
    """The authors' quintic Newton-Schulz iteration: an approximate orthogonalisation U S' V^T of G = U S V^T.

    G: a matrix (..., rows, cols), or a batch of them. The iteration runs in ``dtype`` (the authors:
    bfloat16; None keeps G's dtype), on the transpose when rows > cols, after dividing by the Frobenius
    norm plus ``eps``; each step is X <- a X + (b A + c A^2) X with A = X X^T. The result, in G's dtype, has
    singular values in roughly [0.7, 1.2] rather than exactly 1 (the coefficients trade convergence for
    a steep slope at zero), and zero where G has none: a zero or rank-deficient G gives no NaN.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G if dtype is None else G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def shape_factor(rows: int, cols: int, scale: str) -> float:
    """The update's scale for a (rows, cols) matrix: "jordan" max(1, rows/cols)^0.5 (muon.py), "moonshot"
    0.2 sqrt(max(rows, cols)) (arXiv 2502.16982: the update's RMS matches AdamW's, about 0.2)."""
    if scale == "jordan":
        return max(1.0, rows / cols) ** 0.5
    return 0.2 * math.sqrt(max(rows, cols))


def muon_update(params, grads, momentum_buffer, *, lr, momentum, nesterov=True, ns_steps=5,
                ns_dtype=torch.bfloat16, ns_eps=1e-7, scale="jordan"):
    """b <- lerp(b, g, 1 - mu); d = lerp(g, b, mu) (Nesterov) or b; p <- p - lr * factor * NS(d as a matrix).

    Matrices of the same 2D shape go through the iteration together, stacked into one batch (bmm). A DTensor
    direction (FSDP2, tensor parallelism) is gathered whole, orthogonalised on every process alike, and each process
    keeps its own shard of the result: the whole matrix's step, at the cost of every process running every matrix's
    iteration.
    """
    mt.lerp_(momentum_buffer, grads, 1.0 - momentum)
    directions = [torch.lerp(g, b, momentum) for g, b in zip(grads, momentum_buffer)] if nesterov \
        else list(momentum_buffer)
    layouts = {}  # index -> (mesh, placements) of a DTensor direction, gathered whole
    for i, d in enumerate(directions):
        if not mt.plain(d):
            layouts[i] = (d.device_mesh, d.placements)
            directions[i] = d.full_tensor()
    if layouts:
        from torch.distributed.tensor import distribute_tensor
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if p.numel() > 0:
            by_shape[matrix_shape(p.shape)].append(i)
    for (rows, cols), idx in by_shape.items():
        batch = torch.stack([directions[i].reshape(rows, cols) for i in idx])
        ortho = newton_schulz(batch, ns_steps, dtype=ns_dtype, eps=ns_eps)
        step = -lr * shape_factor(rows, cols, scale)
        for j, i in enumerate(idx):
            update = ortho[j].reshape(params[i].shape)
            if i in layouts:
                # Every process holds the same whole result: each takes its own shard, no communication.
                update = distribute_tensor(update, *layouts[i], src_data_rank=None)
            params[i].add_(update, alpha=step)


def fallback_lr(group: dict[str, Any], key: str, lr: float) -> float:
    """The learning rate of a method's built-in AdamW: ``group[key]`` (``lr`` when None), scaled as ``lr`` is
    scaled from its value at construction (group["initial_lr"]), so that LR schedulers reach it too."""
    base = group[key]
    if base is None:
        return lr
    base = float(base)
    lr0 = float(group.get("initial_lr", lr))
    return base if lr0 == 0 else base * (lr / lr0)


def record_initial_lr(group: dict[str, Any]) -> None:
    """Keep a group's learning rate at construction as torch's schedulers do (they keep a value already set)."""
    lr = group["lr"]
    group.setdefault("initial_lr", float(lr) if isinstance(lr, Tensor) else lr)


class SplitParams(NamedTuple):
    """A model's parameters split the authors' way: ``muon`` (hidden matrices) and ``adamw`` (the rest)."""

    muon: list[Tensor]
    adamw: list[Tensor]


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """A model's output layer: the module named ``lm_head`` (any depth) if one is, else the last nn.Linear."""
    last = None
    for name, module in model.named_modules():
        if name.split(".")[-1] == "lm_head":
            return module
        if isinstance(module, torch.nn.Linear):
            last = module
    return last


def split_params(model: torch.nn.Module, head: torch.nn.Module | None = None) -> SplitParams:
    """Split trainable params as Jordan (2024) advises: hidden weights with ndim >= 2 -> Muon; embeddings
    (nn.Embedding), the output head (``head``, default :func:`output_head`) and every param with ndim < 2
    (gains, biases) -> AdamW. Tied weights are listed once (on the AdamW side if either use is AdamW's)."""
    head = output_head(model) if head is None else head
    to_adamw: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) or module is head:
            to_adamw.update(id(p) for p in module.parameters())
    muon, adamw, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (adamw if p.ndim < 2 or id(p) in to_adamw else muon).append(p)
    return SplitParams(muon, adamw)


def muon_param_groups(model: torch.nn.Module, head: torch.nn.Module | None = None,
                      **adamw_options: Any) -> list[dict[str, Any]]:
    """Param groups for :class:`Muon` from :func:`split_params`: ``[{use_muon: True}, {use_muon: False}]``.

    ``adamw_options`` (e.g. ``adamw_lr=3e-3``) go into the AdamW group. Empty groups are left out.
    """
    split = split_params(model, head)
    groups = []
    if split.muon:
        groups.append({"params": split.muon, "use_muon": True})
    if split.adamw:
        groups.append({"params": split.adamw, "use_muon": False, **adamw_options})
    return groups


def _ns_dtype_check(name: str, value: Any) -> None:
    if value not in _NS_DTYPES:
        raise ValueError(f"{name} must be None (the parameter's working dtype) or one of torch.bfloat16, "
                         f"torch.float16, torch.float32, torch.float64; got {value!r}")


_ns_dtype_check.bad_example = torch.int32


@register("muon", family="matrix", paper="Jordan et al. 2024, Muon: An optimizer for hidden layers in neural "
          "networks (blog); Liu et al. 2025, Muon is Scalable for LLM Training",
          arxiv="2502.16982", reference="KellerJordan/Muon (muon.py); float64 NumPy transcription",
          state_words=1, needs=("matrix-params",),
          example_kwargs={"lr": 0.02, "adamw_lr": 1e-2, "ns_dtype": None},
          conformance_skip={
              "complex": "the authors' Newton-Schulz orthogonalisation is defined for real matrices; complex "
                         "matrix params are rejected with a clear error",
              "tiny_lr": "params with ndim < 2 take the AdamW fallback's own lr (adamw_lr), as in the authors' "
                         "MuonWithAuxAdam, so lr=1e-28 leaves them moving"},
          search_space={"lr": ("log", 2e-3, 0.2), "one_minus_momentum": ("log", 0.01, 0.2),
                        "adamw_lr": ("log", 1e-4, 1e-2)})
class Muon(Optimizer):
    """Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks", blog and
    KellerJordan/Muon), with the update scaling of "Muon is Scalable for LLM Training" (Liu et al. 2025,
    arXiv 2502.16982) as an option; the trust-region reading is in arXiv 2503.12645.

    For a matrix parameter W (ndim >= 2, viewed as (rows, cols) = (shape[0], prod(shape[1:])), so conv
    filters (out, in, k, k) become (out, in*k*k)) with gradient G:

        B <- mu B + (1 - mu) G;   D = (1 - mu) G + mu B (nesterov) or B
        W <- W (1 - lr wd) - lr * s * NS5(D)

    NS5 is :func:`newton_schulz`: D / (||D||_F + ns_eps), transposed when rows > cols, then ns_steps steps of
    X <- a X + (b A + c A^2) X, A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315), run in ``ns_dtype``
    (bfloat16 as the authors; None: the parameter's working dtype, float32 or float64). The factor s is
    ``scale="jordan"``: max(1, rows/cols)^0.5 (muon.py), or ``scale="moonshot"``: 0.2 sqrt(max(rows, cols)),
    which matches the update's RMS to AdamW's so that lr and weight_decay can be AdamW's (use lr ~ 1e-3 there).
    Same-shape matrices run through the iteration as one batch. Weight decay is decoupled (p *= 1 - lr wd).

    Params with ndim < 2 (gains, biases) go to a built-in AdamW, as the authors' MuonWithAuxAdam:
    m <- lerp(m, g, 1-b1), v <- lerp(v, g^2, 1-b2), p <- p (1 - lr_a wd_a) - lr_a m_hat / (sqrt(v_hat) + eps_a),
    with its own ``adamw_lr``, ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``. A param group's
    ``use_muon`` sends its params to Muon (True; a non-matrix param there is an error), to AdamW (False) or
    by shape (None). Jordan advises AdamW for embeddings and the output head too: :func:`muon_param_groups`
    builds such groups from a model. The fallback's lr follows the group's ``lr`` when a scheduler (or you)
    changes it: lr_a = adamw_lr * lr / initial_lr.

    Defaults (the authors'): lr 0.02, momentum 0.95, nesterov True, ns_steps 5, ns_dtype bfloat16, ns_eps 1e-7,
    weight_decay 0, scale "jordan"; AdamW: lr 3e-4, betas (0.9, 0.95), eps 1e-10, weight_decay 0.
    State: momentum_buffer for matrices (1 word), exp_avg and exp_avg_sq for the rest (2 words).

    Deliberate differences from muon.py: params without a gradient are skipped (the authors give them a zero
    gradient, which still moves them by the momentum); the gradient is not overwritten by the Nesterov
    blend; tensors with ndim > 2 are all viewed as (shape[0], -1) (the authors flatten only 4D ones and run
    3D ones as a batch of matrices), and the scale s uses that 2D view's shape (the authors use the last two
    dims of the unflattened gradient, k/k = 1 for square conv kernels). Moonshot's code uses shape[:2] for
    conv weights and unnormalised momentum (B <- mu B + G), which NS's normalisation makes equivalent up
    to ns_eps; the momentum here is always the authors' (Jordan's) form.
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "nesterov": checks.boolean,
                   "ns_steps": checks.integer(0), "ns_dtype": _ns_dtype_check, "ns_eps": checks.positive,
                   "weight_decay": checks.nonnegative, "scale": checks.choice("jordan", "moonshot"),
                   "use_muon": checks.choice(None, True, False), "adamw_lr": checks.nonnegative,
                   "adamw_betas": checks.betas(2), "adamw_eps": checks.positive,
                   "adamw_weight_decay": checks.nonnegative}
    weight_decay_mode = "custom"
    elementwise = False
    per_tensor = False
    fusable = False  # Newton-Schulz is matmul-bound: no torch.compile elementwise target
    update = staticmethod(muon_update)

    @classmethod
    def takes_dtensor_params(cls) -> bool:
        """DTensor params too: the iteration runs on each matrix gathered whole (see :func:`muon_update`); the
        AdamW fallback is elementwise."""
        return True

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16,
                 ns_eps=1e-7, weight_decay=0.0, scale="jordan", use_muon=None, adamw_lr=3e-4,
                 adamw_betas=(0.9, 0.95), adamw_eps=1e-10, adamw_weight_decay=0.0, *, maximize=False, **engine):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype,
                        ns_eps=ns_eps, weight_decay=weight_decay, scale=scale, use_muon=use_muon,
                        adamw_lr=adamw_lr, adamw_betas=tuple(adamw_betas) if isinstance(adamw_betas, list)
                        else adamw_betas, adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, **engine)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking that its Muon params are real matrices (nothing is added otherwise)."""
        if isinstance(param_group, dict):
            use_muon = param_group.get("use_muon", self.defaults.get("use_muon"))
            params = param_group.get("params", [])
            plist = [params] if isinstance(params, Tensor) else list(params)
            param_group = {**param_group, "params": plist}
            for i, p in enumerate(plist):
                if not isinstance(p, Tensor) or use_muon is False:
                    continue
                if use_muon is True and p.ndim < 2:
                    raise ValueError(f"Muon: parameter {i} of param group {len(self.param_groups)} has shape "
                                     f"{tuple(p.shape)}, but the group has use_muon=True and the Muon update needs "
                                     f"a matrix (ndim >= 2); give it use_muon=None or False (the AdamW fallback)")
                if p.ndim >= 2 and p.is_complex():
                    raise TypeError(f"Muon: parameter {i} of param group {len(self.param_groups)} is a complex "
                                    f"matrix; the Newton-Schulz orthogonalisation is defined for real matrices "
                                    f"(optimise torch.view_as_real(p), or set use_muon=False for AdamW)")
        super().add_param_group(param_group)
        record_initial_lr(self.param_groups[-1])

    @staticmethod
    def uses_muon(p: Tensor, group: dict[str, Any]) -> bool:
        """Whether p takes the Muon update (else the AdamW fallback) in this group."""
        use = group["use_muon"]
        return p.ndim >= 2 if use is None else use

    def init_state(self, p, group):
        if self.uses_muon(p, group):
            return {"momentum_buffer": self.zeros_state(p)}
        return {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for muon, step, bucket in self._counted_by_kind(group, params, lambda p: self.uses_muon(p, group)):
            if muon:
                self._muon_bucket(group, bucket)
            else:
                self._adamw_bucket(group, bucket, step)

    def _options(self, group: dict[str, Any], wd: float, static: dict[str, Any]) -> dict[str, Any]:
        return dict(static=static, maximize=bool(group["maximize"]), wd_mode="decoupled" if wd != 1.0 else None,
                    stochastic=self.stochastic_rounding)

    def _muon_bucket(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr = self.lr(group)
        wd = 1.0 - lr * group["weight_decay"]
        static = dict(nesterov=group["nesterov"], ns_steps=group["ns_steps"], ns_dtype=group["ns_dtype"],
                      ns_eps=group["ns_eps"], scale=group["scale"])
        _apply_update(muon_update, params, [p.grad for p in params],
                      {"momentum_buffer": [self.state[p]["momentum_buffer"] for p in params]},
                      {"lr": lr, "momentum": group["momentum"]}, wd, **self._options(group, wd, static))

    def _adamw_bucket(self, group: dict[str, Any], params: list[Tensor], step: int) -> None:
        lr = fallback_lr(group, "adamw_lr", self.lr(group))
        beta1, beta2 = group["adamw_betas"]
        wd = 1.0 - lr * group["adamw_weight_decay"]
        grads = [p.grad for p in params]
        states = {k: [self.state[p][k] for p in params] for k in ("exp_avg", "exp_avg_sq")}
        if params[0].is_complex():
            params, grads = [torch.view_as_real(p) for p in params], [torch.view_as_real(g) for g in grads]
            states = {k: [torch.view_as_real(s) for s in v] for k, v in states.items()}
        scalars = dict(beta1=beta1, beta2=beta2, **adam_scalars(lr, group["adamw_eps"], 1.0 - beta1**step,
                                                                math.sqrt(1.0 - beta2**step)))
        _apply_update(adam_update, params, grads, states, scalars, wd,
                      **self._options(group, wd, {"amsgrad": False}))
