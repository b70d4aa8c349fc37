"""Matrix-free curvature operators: Hessian, generalized Gauss-Newton, empirical and true Fisher.

Every operator is a symmetric ``n x n`` matrix over the flattened trainable parameters of a model
(or a chosen subset of them), for a loss averaged over a data set given as batches. Products are
computed batch by batch, so memory stays at a few gradients' worth whatever the data set size.

Each product needs a forward pass and a first derivative built with ``create_graph`` (the
"preparation"), then one more backward pass per vector. For data held as one batch the preparation
is kept between products (``cache_graph=None``, the default), as PyHessian does: the first product
costs the preparation plus one backward pass, later ones only the backward pass. The kept graph is
checked before every product against the model's parameters, buffers and train/eval flags and the
batch tensors (their version counters), and rebuilt when any of them changed; ``clear_cache()``
frees it. ``cache_graph=True`` keeps one graph per batch for data given as a list of several batches
(memory grows with the data); ``False`` never keeps one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "CurvatureError",
    "NotTwiceDifferentiableError",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "hessian",
    "ggn",
    "fisher",
    "evaluate_loss",
]


class CurvatureError(ValueError):
    """Bad input to a curvature instrument (model, loss, data or vector)."""


class NotTwiceDifferentiableError(RuntimeError):
    """The model cannot be differentiated twice (in-place ops, once-differentiable functions)."""


# --------------------------------------------------------------------------------------------------
# data and model plumbing


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _as_batches(data: Any) -> Iterable:
    """A re-iterable collection of (inputs, targets) batches."""
    if data is None:
        raise CurvatureError("data is None: pass an iterable of (inputs, targets) batches")
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor) and isinstance(data[1], Tensor):
        return [data]  # a single (inputs, targets) batch
    try:
        it = iter(data)
    except TypeError:
        raise CurvatureError(
            f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}") from None
    if it is data:  # a one-shot iterator or generator: the operators need several passes
        return list(it)
    return data


def _batch_size(inputs: Any, targets: Any, index: int) -> int:
    xi, ti = _first_tensor(inputs), _first_tensor(targets)
    if xi is None:
        raise CurvatureError(f"batch {index}: inputs hold no tensor")
    if xi.dim() == 0:
        raise CurvatureError(f"batch {index}: inputs are a 0-d tensor; the first dimension must index examples")
    if ti is not None and ti.dim() > 0 and ti.shape[0] != xi.shape[0]:
        raise CurvatureError(
            f"batch {index}: mismatched data: inputs have {xi.shape[0]} examples but targets have {ti.shape[0]}")
    return int(xi.shape[0])


def _iter_batches(batches: Iterable) -> Iterator[tuple[int, Any, Any, int]]:
    count = 0
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise CurvatureError(
                f"batch {i}: expected an (inputs, targets) pair, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        inputs, targets = batch
        yield i, inputs, targets, _batch_size(inputs, targets, i)
        count += 1
    if count == 0:
        raise CurvatureError("data holds no batches")


def double_backward_attention():
    """A context in which ``scaled_dot_product_attention`` runs its math kernel.

    The fused attention kernels (flash, memory-efficient) have no double backward, so a forward pass whose
    gradient is differentiated again (Hessian-vector products, ``backward(create_graph=True)``) must not use
    them; the math kernel computes the same attention with differentiable primitives.
    """
    return sdpa_kernel(SDPBackend.MATH)


def _forward(model: Callable, inputs: Any) -> Any:
    with double_backward_attention():
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


def _check_loss(loss: Any, index: int) -> Tensor:
    if not isinstance(loss, Tensor):
        raise CurvatureError(f"batch {index}: loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise CurvatureError(
            f"batch {index}: loss_fn must return a scalar (mean) loss, got a tensor of shape {tuple(loss.shape)}")
    return loss.reshape(())


def _call_loss(loss_fn: Callable, outputs: Any, targets: Any, index: int) -> Tensor:
    try:
        loss = loss_fn(outputs, targets)
    except (RuntimeError, ValueError, IndexError) as exc:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        tshape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise CurvatureError(
            f"batch {index}: loss_fn failed on model outputs of shape {shape} and targets of shape {tshape} "
            f"(mismatched data?): {exc}") from exc
    return _check_loss(loss, index)


def _call_model(model: Callable, inputs: Any, index: int) -> Any:
    try:
        return _forward(model, inputs)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        xi = _first_tensor(inputs)
        shape = tuple(xi.shape) if xi is not None else type(inputs).__name__
        raise CurvatureError(f"batch {index}: the model failed on inputs of shape {shape} (mismatched data?): "
                             f"{exc}") from exc


_TWICE_MSG = (
    "could not differentiate the model twice ({stage}): {exc}\n"
    "Curvature products need a twice-differentiable model. Usual causes: an in-place operation "
    "(x.add_(), x.mul_(), relu(inplace=True) after an op that saved its output) modifying a tensor "
    "autograd saved, a custom autograd.Function marked @once_differentiable, or an operation without "
    "a double-backward formula (e.g. a fused kernel called directly). Replace the in-place op by its "
    "out-of-place form.")


def _grad(outputs, inputs, grad_outputs=None, *, stage: str, **kw) -> tuple[Tensor | None, ...]:
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, allow_unused=True, **kw)
    except RuntimeError as exc:
        msg = str(exc)
        if "does not require grad" in msg and stage == "first derivative":
            raise CurvatureError("the loss does not depend on the selected parameters through autograd "
                                 "(is the forward pass under torch.no_grad() or detached?)") from exc
        raise NotTwiceDifferentiableError(_TWICE_MSG.format(stage=stage, exc=msg)) from exc


def _check_linear_in_u(jtu: Sequence[Tensor | None]) -> None:
    """``J^T u`` is linear in the dummy ``u``: a non-None entry not requiring grad means the backward graph
    was cut (a once-differentiable function)."""
    if any(g is not None and not g.requires_grad for g in jtu):
        raise NotTwiceDifferentiableError(_TWICE_MSG.format(
            stage="Jacobian-vector product", exc="the backward pass is not differentiable (the graph is cut)"))


def _check_jv(jv: Tensor | None) -> None:
    if jv is None:  # J^T u requires grad, yet does not reach u: the backward graph was cut
        raise NotTwiceDifferentiableError(_TWICE_MSG.format(
            stage="Jacobian-vector product", exc="the backward pass is not differentiable (the graph is cut)"))


def _tensors_in(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors_in(item)]
    return []


def _select_params(model: nn.Module, params: Any) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in model.named_parameters()]
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise CurvatureError("the model has no trainable parameters (none with requires_grad=True)")
        return [n for n, _ in chosen], [p for _, p in chosen]
    by_id = {id(p): n for n, p in named}
    by_name = dict(named)
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    elif isinstance(params, (str, Tensor)):
        params = [params]
    names, tensors = [], []
    for p in params:
        if isinstance(p, str):
            if p not in by_name:
                raise CurvatureError(f"the model has no parameter named {p!r}")
            n, p = p, by_name[p]
        else:
            if not isinstance(p, Tensor) or id(p) not in by_id:
                raise CurvatureError("params must be parameters (or parameter names) of the model")
            n = by_id[id(p)]
        if not p.requires_grad:
            raise CurvatureError(f"parameter {n!r} does not require grad")
        names.append(n)
        tensors.append(p)
    if not tensors:
        raise CurvatureError("the parameter selection is empty: no trainable parameters to differentiate")
    return names, tensors


@contextlib.contextmanager
def _kept_buffers(model: nn.Module, keep: bool):
    """Restore the model's buffers (e.g. BatchNorm running statistics) after the block.

    Through ``.data``, so the buffers' version counters do not move: a kept graph that saved them (the
    running statistics are inputs of batch norm's backward, unused by it in training mode) stays valid.
    """
    if not keep:
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.data.copy_(s)


# --------------------------------------------------------------------------------------------------
# the operators


class CurvatureOperator:
    """A symmetric curvature matrix of ``loss_fn(model(x), y)`` averaged over ``data``, matrix-free.

    The average is over examples: each batch's mean loss is weighted by its size. Products accept a
    flat vector ``(n,)``, a matrix ``(n, k)`` or a tuple of parameter-shaped tensors. The model is used
    in whatever train/eval mode it is in; its buffers (BatchNorm statistics) are restored after every
    pass. ``cache_graph``: keep the forward pass and first derivative between products (None: when the
    data is one batch; True: for every batch of a list of batches; False: never), rebuilt whenever
    the model, its mode or the data changed; a kept graph fixes dropout masks and holds the
    activations' memory until ``clear_cache()``. Subclasses implement ``_prepare`` (forward pass
    and first derivative of one batch) and ``_apply`` (the products from a prepared batch).
    """

    kind = "curvature"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any,
                 params: Any = None, *, keep_buffers: bool = True, cache_graph: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise CurvatureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise CurvatureError("loss_fn must be callable: loss_fn(outputs, targets) -> scalar mean loss")
        self.model = model
        self.loss_fn = loss_fn
        self.data = _as_batches(data)
        self.names, self.params = _select_params(model, params)
        self.keep_buffers = keep_buffers
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for k in self.numels:
            self.offsets.append(self.offsets[-1] + k)
        n = self.offsets[-1]
        self.shape = (n, n)
        dtype = self.params[0].dtype
        for p in self.params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        self.device = self.params[0].device
        self.num_products = 0  # matrix-vector products done so far (a matmat with k columns counts k)
        if cache_graph not in (None, True, False):
            raise CurvatureError(f"cache_graph must be None, True or False, got {cache_graph!r}")
        self.cache_graph = cache_graph
        self._cache: dict[int, Any] = {}
        self._cache_key: Any = None
        self.num_preparations = 0  # forward passes + first derivatives built for products so far

    # ---- the kept graph ---------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Free the kept forward pass and first derivative (the next product rebuilds them)."""
        self._cache = {}
        self._cache_key = None

    def _cacheable(self) -> bool:
        if self.cache_graph is False or not isinstance(self.data, (list, tuple)):
            return False
        return self.cache_graph is True or len(self.data) == 1

    def _fingerprint(self) -> Any:
        """What a kept graph depends on: the model's tensors, modes and the data (None: cannot tell)."""
        try:
            tensors = [*self.model.parameters(), *self.model.buffers()]
            for batch in self.data:
                tensors += _tensors_in(batch)
            return (tuple((id(t), t._version, t.data_ptr(), t.requires_grad) for t in tensors),
                    tuple(m.training for m in self.model.modules()), tuple(id(b) for b in self.data))
        except RuntimeError:  # inference tensors have no version counter
            return None

    # ---- vectors ----------------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into one flat vector."""
        if len(tensors) != len(self.params):
            raise CurvatureError(f"expected {len(self.params)} parameter-shaped tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Split a flat vector into parameter-shaped views."""
        return tuple(flat[a:b].view(p.shape).to(p.dtype)
                     for a, b, p in zip(self.offsets[:-1], self.offsets[1:], self.params))

    def _as_columns(self, x: Any) -> tuple[list[tuple[Tensor, ...]], str]:
        n = self.shape[0]
        if isinstance(x, (tuple, list)):
            if len(x) != len(self.params):
                raise CurvatureError(f"expected {len(self.params)} parameter-shaped tensors, got {len(x)}")
            for t, p, name in zip(x, self.params, self.names):
                if tuple(t.shape) != tuple(p.shape):
                    raise CurvatureError(f"vector for {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            return [tuple(t.to(device=p.device, dtype=p.dtype) for t, p in zip(x, self.params))], "tuple"
        if not isinstance(x, Tensor):
            raise CurvatureError(f"cannot multiply a curvature operator by {type(x).__name__}")
        if x.dim() == 1:
            if x.shape[0] != n:
                raise CurvatureError(f"vector has length {x.shape[0]}, the operator is {n} x {n}")
            return [self.unflatten(x.to(device=self.device, dtype=self.dtype))], "vector"
        if x.dim() == 2:
            if x.shape[0] != n:
                raise CurvatureError(f"matrix has {x.shape[0]} rows, the operator is {n} x {n}")
            cols = x.to(device=self.device, dtype=self.dtype).t().contiguous()
            return [self.unflatten(c) for c in cols], "matrix"
        raise CurvatureError(f"expected a vector or a matrix, got a tensor of shape {tuple(x.shape)}")

    # ---- products ---------------------------------------------------------------------------------
    def _products(self, cols: list[tuple[Tensor, ...]]) -> Tensor:
        """Sum over batches of per-example-weighted products, as an (n, k) matrix (k = len(cols))."""
        key = self._fingerprint() if self._cacheable() else None
        if key is None or key != self._cache_key:
            self.clear_cache()
        acc = torch.zeros(len(cols), self.shape[0], dtype=self.dtype, device=self.device)
        total = 0
        with _kept_buffers(self.model, self.keep_buffers and not (key is not None and self._cache)):
            for index, inputs, targets, size in _iter_batches(self.data):
                state = self._cache.get(index)
                if state is None:
                    state = self._prepare(index, inputs, targets, size)
                    self.num_preparations += 1
                    if key is not None:
                        self._cache[index] = state
                weight, outs = self._apply(state, cols)
                for row, out in zip(acc, outs):
                    self._add_flat(row, out, weight)
                total += size
        if key is not None:
            self._cache_key = self._fingerprint()  # after the buffers were restored
        self.num_products += len(cols)
        acc.div_(total)
        return acc.t() if len(cols) == 1 else acc.t().contiguous()

    def _add_flat(self, row: Tensor, grads: Sequence[Tensor | None], weight: float) -> None:
        for g, a, b in zip(grads, self.offsets[:-1], self.offsets[1:]):
            if g is not None:
                row[a:b].add_(g.detach().reshape(-1), alpha=weight)

    def _flat_or_zeros(self, grads: Sequence[Tensor | None]) -> Tensor:
        return torch.cat([(torch.zeros(p.numel(), dtype=self.dtype, device=self.device) if g is None
                           else g.reshape(-1).to(self.dtype)) for g, p in zip(grads, self.params)])

    def _prepare(self, index: int, inputs: Any, targets: Any, size: int) -> Any:
        """Forward pass and first derivative of one batch (kept between products when cached)."""
        raise NotImplementedError

    def _apply(self, state: Any, cols: list[tuple[Tensor, ...]]) -> tuple[float, list[Sequence[Tensor | None]]]:
        """(weight, one parameter-shaped product per column) from a prepared batch; the operator is the
        sum over batches of weight * product, divided by the number of examples."""
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        """Product with a flat vector of length n."""
        cols, _ = self._as_columns(v)
        return self._products(cols)[:, 0]

    def matmat(self, V: Tensor) -> Tensor:
        """Product with an (n, k) matrix; the forward pass and first derivative are shared by the k columns."""
        cols, _ = self._as_columns(V)
        return self._products(cols)

    def __matmul__(self, x: Any) -> Any:
        cols, form = self._as_columns(x)
        out = self._products(cols)
        if form == "vector":
            return out[:, 0]
        if form == "matrix":
            return out
        return self.unflatten(out[:, 0])

    def to_dense(self, chunk: int = 64) -> Tensor:
        """The full n x n matrix (n products; for small problems and tests)."""
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[:, i:i + chunk]) for i in range(0, n, chunk)], dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (float64 NumPy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            t = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(t).detach().cpu().double().numpy()

        def mm(X):
            t = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(t).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)

    def loss_and_grad(self) -> tuple[float, Tensor]:
        """The average loss and its flat gradient over the selected parameters."""
        g = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        loss_sum, total = 0.0, 0
        with _kept_buffers(self.model, self.keep_buffers):
            for index, inputs, targets, size in _iter_batches(self.data):
                loss = _call_loss(self.loss_fn, _call_model(self.model, inputs, index), targets, index)
                grads = _grad(loss, self.params, stage="first derivative")
                g += size * self._flat_or_zeros(grads)
                loss_sum += size * float(loss.detach())
                total += size
        return loss_sum / total, g / total

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.shape[0]}, params={len(self.params)})"


class HessianOperator(CurvatureOperator):
    """Hessian-vector products by reverse-over-reverse differentiation (Pearlmutter 1994, "Fast exact
    multiplication by the Hessian")."""

    kind = "hessian"

    def _prepare(self, index, inputs, targets, size):
        loss = _call_loss(self.loss_fn, _call_model(self.model, inputs, index), targets, index)
        grads = _grad(loss, self.params, create_graph=True, stage="first derivative")
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return size, [grads[i] for i in live], live

    def _apply(self, state, cols):
        size, grads, live = state
        results = []
        for v in cols:
            if not live:  # the gradient is constant: the Hessian is zero
                results.append([None] * len(self.params))
                continue
            hv = _grad(grads, self.params, [v[i] for i in live], retain_graph=True, stage="second derivative")
            if all(h is None for h in hv):
                raise NotTwiceDifferentiableError(_TWICE_MSG.format(
                    stage="second derivative", exc="the gradient depends on the parameters but no second "
                    "derivative reaches them (the backward graph is cut)"))
            results.append(hv)
        return size, results


class GGNOperator(CurvatureOperator):
    """Generalized Gauss-Newton ``J^T H_L J`` products (Schraudolph 2002, "Fast curvature matrix-vector
    products for second-order gradient descent"); ``J v`` by the double-backward trick."""

    kind = "ggn"

    def _prepare(self, index, inputs, targets, size):
        out = _call_model(self.model, inputs, index)
        if not isinstance(out, Tensor):
            raise CurvatureError(f"the GGN needs the model to return a tensor, got {type(out).__name__}")
        out_d = out.detach().requires_grad_(True)
        loss = _call_loss(self.loss_fn, out_d, targets, index)
        (gl,) = _grad(loss, out_d, create_graph=True, stage="loss gradient")
        if not out.requires_grad:
            raise CurvatureError("the model outputs do not depend on the parameters through autograd")
        u = torch.zeros_like(out, requires_grad=True)
        jtu = _grad(out, self.params, u, create_graph=True, stage="first derivative")
        _check_linear_in_u(jtu)
        live = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        return size, out, out_d, gl, u, [jtu[i] for i in live], live

    def _apply(self, state, cols):
        size, out, out_d, gl, u, jtu, live = state
        results = []
        for v in cols:
            if not live:
                results.append([None] * len(self.params))
                continue
            (jv,) = _grad(jtu, u, [v[i] for i in live], retain_graph=True, stage="Jacobian-vector product")
            _check_jv(jv)
            if gl is None or not gl.requires_grad:
                results.append([None] * len(self.params))
                continue
            (hjv,) = _grad(gl, out_d, jv, retain_graph=True, stage="loss Hessian")
            if hjv is None:
                results.append([None] * len(self.params))
                continue
            results.append(_grad(out, self.params, hjv, retain_graph=True, stage="vector-Jacobian product"))
        return size, results


def _per_example_losses(loss_fn: Callable, out: Tensor, targets: Tensor, index: int) -> Tensor:
    def one(o, t):
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    try:
        losses = torch.func.vmap(one)(out, targets)
    except Exception:  # loss functions vmap cannot handle: one example at a time
        losses = torch.stack([one(out[i], targets[i]).reshape(()) for i in range(out.shape[0])])
    if losses.shape != (out.shape[0],):
        raise CurvatureError(f"batch {index}: loss_fn on one example must give a scalar, got shape "
                             f"{tuple(losses.shape[1:])}")
    return losses


def _is_loss(loss_fn: Callable, module_cls: type, fn: Callable) -> bool:
    return isinstance(loss_fn, module_cls) or loss_fn is fn


def default_sampler(loss_fn: Callable) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """Label sampler of the predictive distribution implied by a built-in loss, or None.

    Cross-entropy: labels drawn from ``softmax(logits)`` over dim 1. Mean squared error (mean over the
    d output entries of an example): ``y = f + sqrt(d/2) * N(0, I)``, the Gaussian whose negative
    log-likelihood is the per-example loss (so the true Fisher equals the GGN in expectation).
    """
    import torch.nn.functional as F

    if _is_loss(loss_fn, nn.CrossEntropyLoss, F.cross_entropy):
        def sample_categorical(out: Tensor, gen: torch.Generator) -> Tensor:
            logits = out.movedim(1, -1) if out.dim() > 2 else out
            probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1)
            y = torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1])
            return y
        return sample_categorical
    if _is_loss(loss_fn, nn.MSELoss, F.mse_loss):
        def sample_gaussian(out: Tensor, gen: torch.Generator) -> Tensor:
            d = out[0].numel()
            noise = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
            return out + math.sqrt(d / 2.0) * noise
        return sample_gaussian
    return None


class FisherOperator(CurvatureOperator):
    """Fisher products ``(1/N) sum_i g_i g_i^T v`` from per-example loss gradients ``g_i``.

    ``kind="empirical"`` uses the data's labels (the empirical Fisher; see Kunstner et al. 2019,
    "Limitations of the empirical Fisher approximation", arXiv 1905.12558); ``kind="true"`` draws
    ``mc_samples`` labels per example from the model's predictive distribution (Amari 1998, natural
    gradient; Martens 2014, arXiv 1412.1193), seeded and fixed per batch index, so the operator is the
    same matrix on every pass (keep the batch order fixed). ``J_l v`` by the double-backward trick.
    """

    def __init__(self, model, loss_fn, data, params=None, *, kind: str = "empirical", mc_samples: int = 1,
                 seed: int = 0, sample_targets: Callable | None = None, keep_buffers: bool = True,
                 cache_graph: bool | None = None) -> None:
        super().__init__(model, loss_fn, data, params, keep_buffers=keep_buffers, cache_graph=cache_graph)
        if kind not in ("empirical", "true"):
            raise CurvatureError(f"kind must be 'empirical' or 'true', got {kind!r}")
        if mc_samples < 1:
            raise CurvatureError(f"mc_samples must be >= 1, got {mc_samples}")
        self.kind = f"fisher_{kind}"
        self.fisher_kind = kind
        self.mc_samples = mc_samples if kind == "true" else 1
        self.seed = seed
        self.sampler = sample_targets or default_sampler(loss_fn)
        if kind == "true" and self.sampler is None:
            raise CurvatureError("the true Fisher needs the model's predictive distribution: use "
                                 "nn.CrossEntropyLoss / nn.MSELoss (or their functional forms), or pass "
                                 "sample_targets=fn(outputs, generator) -> sampled targets")

    def _prepare(self, index, inputs, targets, size):
        out = _call_model(self.model, inputs, index)
        if not isinstance(out, Tensor):
            raise CurvatureError(f"the Fisher needs the model to return a tensor, got {type(out).__name__}")
        if self.fisher_kind == "true":
            gen = torch.Generator(device=out.device)
            gen.manual_seed(self.seed * 1_000_003 + index)
            s = self.mc_samples
            out_rep = out.unsqueeze(1).expand(out.shape[0], s, *out.shape[1:]).reshape(-1, *out.shape[1:])
            tgt = self.sampler(out_rep.detach(), gen)
            losses = _per_example_losses(self.loss_fn, out_rep, tgt, index) / math.sqrt(s)
        else:
            if not isinstance(targets, Tensor):
                raise CurvatureError("the empirical Fisher needs targets as one tensor")
            _call_loss(self.loss_fn, out, targets, index)  # checks shapes and scalar-ness
            losses = _per_example_losses(self.loss_fn, out, targets, index)
        u = torch.zeros_like(losses, requires_grad=True)
        jtu = _grad(losses, self.params, u, create_graph=True, stage="first derivative")
        _check_linear_in_u(jtu)
        live = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        return losses, u, [jtu[i] for i in live], live

    def _apply(self, state, cols):
        losses, u, jtu, live = state
        results = []
        for v in cols:
            if not live:
                results.append([None] * len(self.params))
                continue
            (jv,) = _grad(jtu, u, [v[i] for i in live], retain_graph=True, stage="Jacobian-vector product")
            _check_jv(jv)
            results.append(_grad(losses, self.params, jv, retain_graph=True, stage="vector-Jacobian product"))
        return 1.0, results  # the per-example losses are summed, not averaged: no batch-size weight


# --------------------------------------------------------------------------------------------------
# constructors


def hessian(model: nn.Module, loss_fn: Callable, data: Any, params: Any = None, *,
            keep_buffers: bool = True, cache_graph: bool | None = None) -> HessianOperator:
    """The Hessian of the data-averaged loss as a matrix-free operator (Pearlmutter 1994).

    ``data``: an iterable of ``(inputs, targets)`` batches (or one such pair); ``loss_fn(outputs,
    targets)`` returns the scalar mean loss of a batch; ``params``: None (every trainable parameter),
    a submodule, or a list of parameters / parameter names (e.g. one layer). ``cache_graph``: keep the
    forward pass and first derivative between products (None: when the data is one batch; see
    ``CurvatureOperator``).
    """
    return HessianOperator(model, loss_fn, data, params, keep_buffers=keep_buffers, cache_graph=cache_graph)


def ggn(model: nn.Module, loss_fn: Callable, data: Any, params: Any = None, *,
        keep_buffers: bool = True, cache_graph: bool | None = None) -> GGNOperator:
    """The generalized Gauss-Newton matrix ``J^T H_L J`` as an operator (Schraudolph 2002)."""
    return GGNOperator(model, loss_fn, data, params, keep_buffers=keep_buffers, cache_graph=cache_graph)


def fisher(model: nn.Module, loss_fn: Callable, data: Any, params: Any = None, *, kind: str = "empirical",
           mc_samples: int = 1, seed: int = 0, sample_targets: Callable | None = None,
           keep_buffers: bool = True, cache_graph: bool | None = None) -> FisherOperator:
    """The empirical or true (label-sampled) Fisher as an operator (Amari 1998; Martens 2014, 1412.1193)."""
    return FisherOperator(model, loss_fn, data, params, kind=kind, mc_samples=mc_samples, seed=seed,
                          sample_targets=sample_targets, keep_buffers=keep_buffers, cache_graph=cache_graph)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: Callable, data: Any) -> float:
    """The example-weighted average of ``loss_fn`` over ``data`` (no gradients)."""
    total, s = 0, 0.0
    with _kept_buffers(model, True):
        for index, inputs, targets, size in _iter_batches(_as_batches(data)):
            s += size * float(_call_loss(loss_fn, _call_model(model, inputs, index), targets, index))
            total += size
    return s / total
