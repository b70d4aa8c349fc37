"""Loss-landscape slices: filter-normalized random directions, Hessian-eigenvector axes, interpolation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .eigen import top_eigenvalues
from .operators import CurvatureError, CurvatureOperator, _select_params, evaluate_loss

__all__ = ["random_direction", "eigen_directions", "loss_slice_1d", "loss_slice_2d", "interpolate",
           "plot_slice_1d", "plot_slice_2d"]

Direction = Sequence[Tensor]


def random_direction(model: nn.Module, params: Any = None, *, filter_normalize: bool = True,
                     ignore_1d: bool = True, seed: int = 0) -> tuple[Tensor, ...]:
    """A Gaussian random direction over the selected parameters, filter-normalized as in Li et al. 2018,
    "Visualizing the loss landscape of neural nets" (arXiv 1712.09913).

    Filter normalization rescales each filter ``d_i`` (a slice along dim 0: a row of a linear weight, an
    output channel of a convolution) to the norm of the matching parameter filter. One-dimensional
    parameters (biases, norm scales) get a zero direction when ``ignore_1d``, as in the paper, else
    are normalized as a whole.
    """
    _, ps = _select_params(model, params)
    gen = torch.Generator(device=ps[0].device)
    gen.manual_seed(seed)
    out = []
    for p in ps:
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
        if filter_normalize:
            if p.dim() <= 1:
                d = torch.zeros_like(d) if ignore_1d else d * (p.detach().norm() / d.norm().clamp_min(1e-30))
            else:
                pn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
                dn = d.reshape(p.shape[0], -1).norm(dim=1).clamp_min(1e-30)
                d = d * (pn / dn).reshape(-1, *([1] * (p.dim() - 1)))
        out.append(d)
    return tuple(out)


def eigen_directions(op: CurvatureOperator, k: int = 2, **kwargs: Any) -> list[tuple[Tensor, ...]]:
    """The top-k Hessian eigenvectors as parameter-shaped unit directions (axes for slices)."""
    _, vecs = top_eigenvalues(op, k=k, **kwargs)
    return [op.unflatten(vecs[:, i]) for i in range(k)]


@contextlib.contextmanager
def _restored(ps: Sequence[Tensor]):
    saved = [p.detach().clone() for p in ps]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(ps, saved):
                p.copy_(s)


def _axis(values, points: int, lo: float = -1.0, hi: float = 1.0) -> Tensor:
    if values is None:
        return torch.linspace(lo, hi, points, dtype=torch.float64)
    return torch.as_tensor(values, dtype=torch.float64)


def _check_dir(d: Direction, ps: Sequence[Tensor], what: str) -> None:
    if len(d) != len(ps):
        raise CurvatureError(f"{what} has {len(d)} tensors, the parameter selection has {len(ps)}")
    for t, p in zip(d, ps):
        if tuple(t.shape) != tuple(p.shape):
            raise CurvatureError(f"{what}: a tensor of shape {tuple(t.shape)} where the parameter is {tuple(p.shape)}")


def loss_slice_1d(model: nn.Module, loss_fn: Callable, data: Any, direction: Direction,
                  alphas: Tensor | Sequence[float] | None = None, params: Any = None) -> tuple[Tensor, Tensor]:
    """Loss along ``theta + alpha * d`` (Goodfellow et al. 2014; Li et al. 2018, arXiv 1712.09913).

    Returns ``(alphas, losses)``; the parameters are restored afterwards.
    """
    _, ps = _select_params(model, params)
    _check_dir(direction, ps, "direction")
    alphas = _axis(alphas, 41)
    losses = torch.empty(len(alphas), dtype=torch.float64)
    with _restored(ps) as base:
        for i, a in enumerate(alphas.tolist()):
            with torch.no_grad():
                for p, b, d in zip(ps, base, direction):
                    p.copy_(b + a * d.to(b))
            losses[i] = evaluate_loss(model, loss_fn, data)
    return alphas, losses


def loss_slice_2d(model: nn.Module, loss_fn: Callable, data: Any, dir1: Direction, dir2: Direction,
                  alphas: Tensor | Sequence[float] | None = None, betas: Tensor | Sequence[float] | None = None,
                  params: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Loss on the plane ``theta + alpha * d1 + beta * d2`` (Li et al. 2018, arXiv 1712.09913).

    Returns ``(alphas, betas, losses)`` with ``losses[i, j]`` at ``(alphas[i], betas[j])``.
    """
    _, ps = _select_params(model, params)
    _check_dir(dir1, ps, "dir1")
    _check_dir(dir2, ps, "dir2")
    alphas, betas = _axis(alphas, 21), _axis(betas, 21)
    losses = torch.empty(len(alphas), len(betas), dtype=torch.float64)
    with _restored(ps) as base:
        for i, a in enumerate(alphas.tolist()):
            for j, b_ in enumerate(betas.tolist()):
                with torch.no_grad():
                    for p, b, d1, d2 in zip(ps, base, dir1, dir2):
                        p.copy_(b + a * d1.to(b) + b_ * d2.to(b))
                losses[i, j] = evaluate_loss(model, loss_fn, data)
    return alphas, betas, losses


def _state(x: Any) -> Mapping[str, Tensor]:
    if isinstance(x, nn.Module):
        return x.state_dict()
    if isinstance(x, Mapping):
        return x
    raise CurvatureError(f"a checkpoint must be a state_dict or a module, got {type(x).__name__}")


def interpolate(model: nn.Module, loss_fn: Callable, data: Any, start: Any, end: Any,
                alphas: Tensor | Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """Loss along the straight line ``(1 - alpha) * start + alpha * end`` between two checkpoints
    (Goodfellow, Vinyals and Saxe 2014, "Qualitatively characterizing neural network optimization
    problems", arXiv 1412.6544). Floating-point entries of the state dicts are interpolated, others
    taken from ``start``. The model's own state is restored afterwards.
    """
    sa, sb = _state(start), _state(end)
    if set(sa) != set(sb):
        raise CurvatureError(f"the checkpoints hold different entries: {sorted(set(sa) ^ set(sb))}")
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if set(own) != set(sa):
        raise CurvatureError(f"the checkpoints do not match the model: {sorted(set(own) ^ set(sa))}")
    alphas = _axis(alphas, 31, -0.25, 1.25)
    losses = torch.empty(len(alphas), dtype=torch.float64)
    try:
        for i, a in enumerate(alphas.tolist()):
            mixed = {k: ((1 - a) * sa[k] + a * sb[k].to(sa[k]) if sa[k].is_floating_point() else sa[k])
                     for k in sa}
            model.load_state_dict(mixed)
            losses[i] = evaluate_loss(model, loss_fn, data)
    finally:
        model.load_state_dict(own)
    return alphas, losses


def _figure(ax):
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        return fig, ax
    return ax.figure, ax


def plot_slice_1d(alphas: Tensor, losses: Tensor, path: str | None = None, ax=None, label: str | None = None,
                  xlabel: str = "alpha", title: str = "loss along a direction"):
    """Plot a 1D slice (or an interpolation); save to ``path`` when given."""
    fig, ax = _figure(ax)
    ax.plot(torch.as_tensor(alphas).numpy(), torch.as_tensor(losses).numpy(), label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    if label:
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_slice_2d(alphas: Tensor, betas: Tensor, losses: Tensor, path: str | None = None, ax=None,
                  levels: int = 30, title: str = "loss surface"):
    """Contour plot of a 2D slice (Li et al. 2018 style); save to ``path`` when given."""
    fig, ax = _figure(ax)
    A, B = torch.meshgrid(torch.as_tensor(alphas), torch.as_tensor(betas), indexing="ij")
    cs = ax.contour(A.numpy(), B.numpy(), torch.as_tensor(losses).numpy(), levels=levels)
    ax.clabel(cs, inline=True, fontsize=6)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
