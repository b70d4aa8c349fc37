"""K-FAC: Kronecker-factored approximate curvature for nn.Linear and nn.Conv2d layers of a model."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import checks
from ..core import multitensor as mt
from ..core.global_step import GlobalStepOptimizer
from ..core.precision import outside_autocast, working_dtype
from ..core.registry import register


def kl_clip_check(name: str, value: Any) -> None:
    """A positive number, or None (no KL clipping)."""
    if value is None:
        return
    checks.positive(name, value)


kl_clip_check.bad_example = 0.0


class Layer:
    """A hooked nn.Linear / nn.Conv2d: its parameters and the statistics captured since the last step."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        self.weight: Tensor = module.weight
        self.bias: Tensor | None = module.bias
        self.pending_a: list[Tensor] = []
        self.pending_g: list[Tensor] = []

    @property
    def a_dim(self) -> int:
        return self.weight[0].numel() + (self.bias is not None)

    @property
    def g_dim(self) -> int:
        return self.weight.shape[0]


def supported(module: nn.Module) -> bool:
    """Layers K-FAC preconditions: nn.Linear, and nn.Conv2d with groups=1, zero padding, explicit padding."""
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


@outside_autocast
def input_covariance(layer: Layer, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The batch's A factor: E[a a^T] over examples, a = [input; 1] (KFC for convolutions)."""
    x = x.detach().to(dtype)
    if layer.kind == "linear":
        a = x.reshape(-1, x.shape[-1])
        if layer.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        return a.t() @ (a / a.shape[0])
    m = layer.module
    batch = x.shape[0]
    patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    spatial = patches.shape[-1]
    a = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (batch * spatial, in * kh * kw)
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    a = a / spatial
    return a.t() @ (a / batch)


@outside_autocast
def output_grad_covariance(layer: Layer, g: Tensor, dtype: torch.dtype, batch_averaged: bool) -> Tensor:
    """The batch's G factor: E[g g^T] over examples of the gradients w.r.t. the layer's outputs."""
    g = g.detach().to(dtype)
    if layer.kind == "linear":
        g = g.reshape(-1, g.shape[-1])
        batch = g.shape[0]
        return g.t() @ (g * batch) if batch_averaged else g.t() @ (g / batch)
    batch, spatial = g.shape[0], g.shape[2] * g.shape[3]
    g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    if batch_averaged:
        g = g * batch
    g = g * spatial
    return g.t() @ (g / g.shape[0])


def kfac_denominator(d_a: Tensor, d_g: Tensor, damping: float, mode: str) -> Tensor:
    """The (out, in) array dividing Q_g^T grad Q_a: the damped eigenvalues of the Kronecker product."""
    if mode == "eigen":
        return d_g.unsqueeze(1) * d_a.unsqueeze(0) + damping
    root = math.sqrt(damping)
    pi = 1.0
    if mode == "pi":
        mean_a, mean_g = float(d_a.sum()) / d_a.numel(), float(d_g.sum()) / d_g.numel()
        if mean_a > 0 and mean_g > 0:
            pi = math.sqrt(mean_a / mean_g)
    return (d_g + root / pi).unsqueeze(1) * (d_a + root * pi).unsqueeze(0)


def precondition(grad_mat: Tensor, q_a: Tensor, d_a: Tensor, q_g: Tensor, d_g: Tensor, damping: float,
                 mode: str) -> Tensor:
    """(G + g_damp I)^{-1} grad_mat (A + a_damp I)^{-1} (or (A (x) G + damping I)^{-1} vec(grad) for "eigen")."""
    v = q_g.t() @ grad_mat @ q_a
    v = v / kfac_denominator(d_a, d_g, damping, mode)
    return q_g @ v @ q_a.t()


class LayerHookOptimizer(GlobalStepOptimizer):
    """Base of the optimizers that hook a model's Linear and Conv2d layers (K-FAC, MKOR): the hooks queue
    per-batch statistics on each :class:`Layer` (``pending_a``, ``pending_g``), a step folds them in, and
    the queue is cleared after every step, whether it succeeded or not, so that a failed or skipped step
    leaves no statistics behind."""

    layers: list[Layer]
    _handles: list[Any]

    def _attach(self, model, defaults: dict[str, Any], engine: dict[str, Any], fallback: str) -> None:
        """Build the optimizer over ``model``'s parameters and hook its real Linear and Conv2d layers.

        A bare parameter list is accepted (with a warning): nothing is hooked and every parameter takes
        ``fallback``.
        """
        is_model = isinstance(model, nn.Module)
        if is_model:
            lazy = [name for name, m in model.named_modules()
                    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
            if lazy:
                # Hooked by type, a LazyLinear is no nn.Linear until its first forward: every layer would silently
                # take the fallback step.
                raise ValueError(f"{type(self).__name__}: model holds lazy modules whose shapes are not known yet "
                                 f"({', '.join(repr(n) for n in lazy[:3])}{', ...' if len(lazy) > 3 else ''}); run "
                                 f"one forward pass (model(x)) before building the optimizer, so that its layers "
                                 f"can be hooked")
        GlobalStepOptimizer.__init__(self, model.parameters() if is_model else model, defaults, **engine)
        self.layer_steps = 0
        self.layers = []
        self.layer_state: list[dict[str, Tensor]] = []
        self._handles = []
        if not is_model:
            warnings.warn(f"{type(self).__name__} was given parameters, not the model: no layer is hooked and every "
                          f"parameter takes {fallback}; pass the nn.Module to precondition its Linear and Conv2d "
                          f"layers", UserWarning, stacklevel=3)
            return
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        for module in model.modules():
            if not supported(module) or id(module.weight) not in owned:
                continue
            if module.weight.is_complex() or not module.weight.is_floating_point():
                raise TypeError(f"{type(self).__name__}: layer {module} has {module.weight.dtype} weights; it "
                                f"needs real floating-point layers")
            self.layers.append(Layer(module))
        for layer in self.layers:
            # A partial of a bound method (not a closure): copy.deepcopy of the model and optimizer together
            # then hooks the copied model to the copied optimizer.
            self._handles.append(layer.module.register_forward_hook(functools.partial(self._forward_hook, layer)))
        self.layer_state = [{} for _ in self.layers]

    def _forward_hook(self, layer: Layer, module: nn.Module, inputs: tuple, output: Any) -> None:
        """Capture ``layer``'s statistics from a forward pass (and, through a tensor hook, its backward pass)."""
        raise NotImplementedError

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (no more statistics are captured)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear_stats(self) -> None:
        """Drop the statistics captured since the last step (the hooks' queues)."""
        for layer in self.layers:
            layer.pending_a.clear()
            layer.pending_g.clear()

    # -------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        try:
            return super().step(closure)
        finally:
            self.clear_stats()

    # -------------------------------------------------------------------------------------- state_dict
    # Subclasses name their entry in the state_dict and the shapes of each layer's state.
    layer_state_key: str = ""
    layer_state_what: str = ""

    def layer_shapes(self, layer: Layer) -> dict[str, tuple[int, ...]]:
        """The shape of every per-layer state tensor this optimizer keeps for ``layer``."""
        raise NotImplementedError

    @staticmethod
    def _layer_matrix(layer: Layer, where: dict[int, tuple[Any, int]]) -> tuple[tuple[Any, int], Any, Tensor] | None:
        """A layer's gradient as one matrix: the weight's rows (fan-in flattened), the bias as a last column
        (zeros where the bias has no gradient); with the weight's and the bias's (bucket, index) slots, or None
        for a layer whose weight has no gradient this step."""
        if id(layer.weight) not in where:
            return None
        bw, iw = where[id(layer.weight)]
        gw = bw.g[iw]
        mat = gw.reshape(gw.shape[0], -1)
        bias_slot = where.get(id(layer.bias)) if layer.bias is not None else None
        if layer.bias is not None:
            gb = bias_slot[0].g[bias_slot[1]] if bias_slot else gw.new_zeros(gw.shape[0])
            mat = torch.cat([mat, gb.reshape(-1, 1).to(mat.dtype)], 1)
        return (bw, iw), bias_slot, mat

    @staticmethod
    def _scatter(weight_slot: tuple[Any, int], bias_slot: tuple[Any, int] | None, v: Tensor) -> None:
        """A preconditioned layer matrix (as from :meth:`_layer_matrix`) back into the weight's and bias's
        gradients."""
        bw, iw = weight_slot
        w_cols = bw.g[iw][0].numel()
        bw.g[iw] = v[:, :w_cols].reshape(bw.g[iw].shape).to(bw.g[iw].dtype)
        if bias_slot is not None:
            bb, ib = bias_slot
            bb.g[ib] = v[:, w_cols].reshape(bb.g[ib].shape).to(bb.g[ib].dtype)

    @staticmethod
    def _momentum_step(bucket: Any, i: int, p: Tensor, d: Tensor, lr: float) -> None:
        """p <- p - lr d, through the heavy-ball buffer buf <- momentum buf + d when the group has momentum."""
        mu = bucket.group["momentum"]
        if mu != 0:
            buf = bucket.s["momentum_buffer"][i]
            buf.mul_(mu).add_(d)
            d = buf
        p.add_(d, alpha=mt.fit(-lr, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict plus this optimizer's entry: the step count and each layer's state."""
        sd = super().state_dict()
        sd[self.layer_state_key] = {"steps": self.layer_steps, "layers": [dict(st) for st in self.layer_state]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of the same optimizer over the same model; raises before any change if it does not fit."""
        name, key = type(self).__name__, self.layer_state_key
        entry = state_dict.get(key) if isinstance(state_dict, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("steps"), numbers.Integral) or \
                not isinstance(entry.get("layers"), list):
            raise ValueError(f"{name}: the state_dict has no {key!r} entry ({self.layer_state_what}): it is not "
                             f"from a {name}")
        if len(entry["layers"]) != len(self.layers):
            raise ValueError(f"{name}: the state_dict holds {len(entry['layers'])} layers, this optimizer hooks "
                             f"{len(self.layers)}: another model layout")
        for i, (layer, st) in enumerate(zip(self.layers, entry["layers"])):
            if not st:
                continue
            shapes = self.layer_shapes(layer)
            if set(st) != set(shapes):
                raise ValueError(f"{name}: layer {i} of the state_dict has keys {sorted(st)}, expected "
                                 f"{sorted(shapes)}")
            for k, shape in shapes.items():
                if not isinstance(st[k], Tensor) or tuple(st[k].shape) != shape:
                    raise ValueError(f"{name}: {k} of layer {i} has the wrong shape (expected {shape}): another "
                                     f"model layout")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != key})
        self.layer_steps = int(entry["steps"])
        self.layer_state = []
        for layer, st in zip(self.layers, entry["layers"]):
            dtype, dev = working_dtype(layer.weight.dtype), layer.weight.device
            self.layer_state.append({k: v.detach().to(device=dev, dtype=dtype, copy=True) for k, v in st.items()})
        self.clear_stats()


@register("kfac", family="matrix",
          paper="Martens & Grosse 2015, Optimizing Neural Networks with Kronecker-factored Approximate Curvature; "
                "Grosse & Martens 2016, A Kronecker-factored approximate Fisher matrix for convolution layers",
          arxiv="1503.05671", reference="alecwangcq/KFAC-Pytorch (optimizers/kfac.py); dense torch.kron "
                                        "float64 transcription on a tiny MLP",
          state_words=1, needs=("matrix-params", "model"),
          example_kwargs={"lr": 0.05, "momentum": 0.9},
          search_space={"lr": ("log", 1e-3, 0.5), "damping": ("log", 1e-4, 1e-1)})
class KFAC(LayerHookOptimizer):
    """K-FAC (Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature", arXiv 1503.05671; convolutions as KFC, Grosse & Martens 2016, arXiv 1602.01407), with the
    step of the widely used alecwangcq/KFAC-Pytorch (KL clipping, momentum, weight decay).

    Construct it from the model: ``KFAC(model, lr=..., ...)``. Forward hooks on every nn.Linear and nn.Conv2d
    (groups=1, zero padding) capture the layer inputs and, through a hook on the layer output, the gradients
    w.r.t. the outputs. For a layer with weight W (out x in; conv filters viewed as out x in*kh*kw) and bias b,
    with a = [input; 1] (the homogeneous 1 only when the layer has a bias) and g the output gradient:

        A_batch = E[a a^T],  G_batch = E[g g^T]   (every T_cov steps; batch_averaged: g is scaled by the batch
                                                    size, as the loss is a batch mean; convolutions as KFC)
        A <- stat_decay A + (1 - stat_decay) A_batch   (A, G start at I, as the authors)
        A = Q_a diag(d_a) Q_a^T,  G = Q_g diag(d_g) Q_g^T      (eigendecompositions every T_inv steps)
        V = Q_g [(Q_g^T [dW, db] Q_a) / den] Q_a^T

    with the damping split ``damping_mode``:

    * ``"pi"`` (default; Martens & Grosse s.6.3, factored Tikhonov): den = (d_g + sqrt(lambda)/pi) (d_a +
      pi sqrt(lambda))^T, pi = sqrt((tr A / dim A) / (tr G / dim G)), i.e. V = (G + sqrt(lambda)/pi I)^{-1}
      [dW, db] (A + pi sqrt(lambda) I)^{-1};
    * ``"sqrt"``: the same with pi = 1, V = (G + sqrt(lambda) I)^{-1} [dW, db] (A + sqrt(lambda) I)^{-1};
    * ``"eigen"`` (alecwangcq/KFAC-Pytorch): den = d_g d_a^T + lambda, the exact (A (x) G + lambda I)^{-1}.

    Then KL clipping over all layers, nu = min(1, sqrt(kl_clip / sum_layers lr^2 <V, [dW, db]>)), every layer
    gradient is replaced by nu V, and every parameter (layer or not) takes the authors' SGD step: d = grad +
    wd p (L2), buf <- momentum buf + d (buf = d at the first step), p <- p - lr buf. Parameters of other
    modules (norms, embeddings, unsupported convs) therefore fall back to SGD with momentum, as the authors.

    Defaults (the authors'): lr 1e-3, momentum 0.9, stat_decay 0.95, damping 1e-3, kl_clip 1e-3 (None: off),
    weight_decay 0, T_cov 10, T_inv 100, batch_averaged True. State: momentum_buffer (1 word per parameter)
    and, per layer, A, G and their eigenvectors and eigenvalues (in the weight's working dtype: float32 for
    16-bit weights, whatever ``state_dtype`` says), saved under ``state_dict()["kfac"]``.

    Statistics: every forward pass run with gradients enabled while a factor update is due (layer_steps %
    T_cov == 0) adds to the next step's A statistics, every backward pass through a hooked layer while
    ``acc_stats`` is True to its G statistics (several passes before one step are averaged); ``step`` uses
    and clears them. By default G is the empirical Fisher (the loss's own backward pass). For the authors'
    true Fisher, backpropagate a loss on labels sampled from the model's predictive distribution with
    ``opt.acc_stats = True`` (``retain_graph=True``), ``opt.zero_grad()``, then the real loss with
    ``opt.acc_stats = False``.

    Bad inputs: a non-finite batch factor is not folded in (that factor keeps its old value, with a
    RuntimeWarning); a failed or non-finite eigendecomposition keeps the previous one (warning). Damping
    keeps rank-deficient factors invertible. Given a plain parameter list instead of a model, no layer is
    hooked and every parameter takes the SGD-momentum fallback (a UserWarning says so).

    Differences from alecwangcq/KFAC-Pytorch: statistics are folded in at ``step`` (the authors update the
    running averages inside the hooks); weight decay applies from the first step (the authors start it after
    20 T_cov steps); eigenvalues are clamped at 0 (the authors zero those below 1e-10); "pi" damping is the
    default (the authors' split is ``damping_mode="eigen"``); KL clipping uses each layer's own group lr (the
    authors use group 0's); a zero <V, grad> gives nu = 1 (the authors divide by zero); Linear inputs with
    more than two dims are flattened into the batch; only modules of exactly type nn.Linear / nn.Conv2d are
    hooked (not subclasses), and grouped / non-zero-padded / string-padded convolutions are not.
    """

    hyperparams = {"lr": checks.nonnegative, "momentum": checks.unit, "weight_decay": checks.nonnegative,
                   "stat_decay": checks.unit, "damping": checks.positive, "kl_clip": kl_clip_check,
                   "T_cov": checks.integer(1), "T_inv": checks.integer(1), "batch_averaged": checks.boolean,
                   "damping_mode": checks.choice("pi", "sqrt", "eigen")}
    shared_options = ("stat_decay", "damping", "kl_clip", "T_cov", "T_inv", "batch_averaged", "damping_mode")

    def __init__(self, model, lr=1e-3, momentum=0.9, stat_decay=0.95, damping=1e-3, kl_clip=1e-3,
                 weight_decay=0.0, T_cov=10, T_inv=100, batch_averaged=True, damping_mode="pi", *,
                 maximize=False, **engine):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, stat_decay=stat_decay,
                        damping=damping, kl_clip=kl_clip, T_cov=T_cov, T_inv=T_inv, batch_averaged=batch_averaged,
                        damping_mode=damping_mode, maximize=maximize)
        self.acc_stats = True
        self._attach(model, defaults, engine, fallback="the SGD-momentum fallback")

    # ------------------------------------------------------------------------------------------- hooks
    def _forward_hook(self, layer: Layer, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not torch.is_grad_enabled() or self.layer_steps % self.param_groups[0]["T_cov"] != 0:
            return
        dtype = working_dtype(layer.weight.dtype)
        layer.pending_a.append(input_covariance(layer, inputs[0], dtype))
        if isinstance(output, Tensor) and output.requires_grad:
            def grad_hook(grad):
                if self.acc_stats:
                    layer.pending_g.append(output_grad_covariance(
                        layer, grad, dtype, self.param_groups[0]["batch_averaged"]))
            output.register_hook(grad_hook)

    def _layer_init(self, i: int) -> dict[str, Tensor]:
        layer = self.layers[i]
        dtype, dev = working_dtype(layer.weight.dtype), layer.weight.device
        st = self.layer_state[i]
        if not st:
            na, ng = layer.a_dim, layer.g_dim
            st.update(A=torch.eye(na, dtype=dtype, device=dev), G=torch.eye(ng, dtype=dtype, device=dev),
                      Q_a=torch.eye(na, dtype=dtype, device=dev), d_a=torch.ones(na, dtype=dtype, device=dev),
                      Q_g=torch.eye(ng, dtype=dtype, device=dev), d_g=torch.ones(ng, dtype=dtype, device=dev))
        return st

    def _update_factors(self, i: int, decay: float) -> None:
        layer, st = self.layers[i], self.layer_state[i]
        for name, pending in (("A", layer.pending_a), ("G", layer.pending_g)):
            if not pending:
                continue
            batch = pending[0] if len(pending) == 1 else torch.stack(pending).mean(0)
            if not bool(torch.isfinite(batch).all()):
                warnings.warn(f"{type(self).__name__}: the {name} statistics of layer {i} ({layer.module}) are not "
                              f"finite at step {self.layer_steps}; that factor keeps its previous value",
                              RuntimeWarning, stacklevel=4)
                continue
            st[name].mul_(decay).add_(batch, alpha=1 - decay)

    def _update_inverse(self, i: int) -> None:
        st = self.layer_state[i]
        for f, q, d in (("A", "Q_a", "d_a"), ("G", "Q_g", "d_g")):
            evals, evecs, info = None, None, 1
            if bool(torch.isfinite(st[f]).all()):
                evals, evecs, info = *torch.linalg.eigh(st[f]), 0
                info = 0 if bool(torch.isfinite(evals).all() and torch.isfinite(evecs).all()) else 1
            if info:
                warnings.warn(f"{type(self).__name__}: the eigendecomposition of factor {f} of layer {i} failed at "
                              f"step {self.layer_steps}; the previous one is kept", RuntimeWarning, stacklevel=4)
                continue
            st[q].copy_(evecs)
            st[d].copy_(evals.clamp(min=0))

    def global_step(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        g0 = self.param_groups[0]
        damping, mode, kl_clip = g0["damping"], g0["damping_mode"], g0["kl_clip"]
        buckets = self.buckets(work)
        where = {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)}
        for i in range(len(self.layers)):
            self._layer_init(i)
        if self.layer_steps % g0["T_cov"] == 0:
            for i in range(len(self.layers)):
                self._update_factors(i, g0["stat_decay"])
        if self.layer_steps % g0["T_inv"] == 0:
            for i in range(len(self.layers)):
                self._update_inverse(i)
        updates = []  # (weight slot, bias slot or None, natural gradient matrix)
        vg_sum = 0.0
        for i, layer in enumerate(self.layers):
            found = self._layer_matrix(layer, where)
            if found is None:
                continue
            weight_slot, bias_slot, mat = found
            st = self.layer_state[i]
            v = precondition(mat.to(st["Q_a"].dtype), st["Q_a"], st["d_a"], st["Q_g"], st["d_g"], damping, mode)
            lr = self.lr(weight_slot[0].group)
            vg_sum += lr * lr * float((v * mat).sum())
            updates.append((weight_slot, bias_slot, v))
        nu = 1.0
        if kl_clip is not None and vg_sum > 0:
            nu = min(1.0, math.sqrt(kl_clip / vg_sum))
        for weight_slot, bias_slot, v in updates:
            self._scatter(weight_slot, bias_slot, v * nu)
        for b in buckets:
            decay, lr = b.group["weight_decay"], self.lr(b.group)
            for i, p in enumerate(b.p):
                self._momentum_step(b, i, p, b.g[i] + decay * p if decay != 0 else b.g[i], lr)
            b.write_back()
        self.count_step(buckets)
        self.layer_steps += 1

    def init_state(self, p, group):
        return {"momentum_buffer": self.zeros_state(p)} if group["momentum"] != 0 else {}

    optional_states = {"momentum_buffer": lambda group: group["momentum"] != 0}

    layer_state_key = "kfac"
    layer_state_what = "step count and layer factors"

    def layer_shapes(self, layer: Layer) -> dict[str, tuple[int, ...]]:
        """Factors A, G, their eigenbases Q_a, Q_g and eigenvalues d_a, d_g."""
        na, ng = layer.a_dim, layer.g_dim
        return {"A": (na, na), "G": (ng, ng), "Q_a": (na, na), "d_a": (na,), "Q_g": (ng, ng), "d_g": (ng,)}

