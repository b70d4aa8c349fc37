"""``steepest curvature``: top eigenvalues, trace, spectral density and loss-landscape plots of a model.

Wire it into the main parser with ``add_curvature_parser(subparsers)``; the sub-command sets
``func`` to :func:`run_curvature`, which returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["add_curvature_parser", "run_curvature", "load_object", "builtin_dataset"]

BUILTIN_DATASETS = ("digits", "blobs")


def load_object(spec: str) -> Any:
    """Resolve ``module.path:name`` or ``path/to/file.py:name`` to the named object."""
    if ":" not in spec:
        raise SystemExit(f"error: expected 'module:name' or 'file.py:name', got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py") or "/" in mod_name or Path(mod_name).is_file():
        path = Path(mod_name)
        if not path.is_file():
            raise SystemExit(f"error: no such file: {path}")
        unique = f"_steepest_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[unique] = module
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise SystemExit(f"error: cannot import {mod_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"error: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def builtin_dataset(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Built-in data: ``digits`` (scikit-learn's 8x8 digits, 1797 x 64, 10 classes, standardized) or
    ``blobs`` (2000 Gaussian points in 32 dimensions, 4 classes)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X, dtype=torch.float32)
        X = (X - X.mean(0)) / (X.std(0) + 1e-6)
        return X, torch.tensor(y, dtype=torch.long)
    if name == "blobs":
        g = torch.Generator().manual_seed(seed)
        centers = 2 * torch.randn(4, 32, generator=g)
        y = torch.randint(0, 4, (2000,), generator=g)
        return centers[y] + torch.randn(2000, 32, generator=g), y
    raise SystemExit(f"error: unknown built-in dataset {name!r}; choose from {', '.join(BUILTIN_DATASETS)} "
                     "or give module:function")


def _batches(obj: Any, batch_size: int, max_examples: int | None) -> list:
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        X, y = obj
        if X.shape[0] != y.shape[0]:
            raise SystemExit(f"error: mismatched data: {X.shape[0]} inputs and {y.shape[0]} targets")
        if max_examples:
            X, y = X[:max_examples], y[:max_examples]
        return [(X[i:i + batch_size], y[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    if isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__len__"):
        n = len(obj) if not max_examples else min(len(obj), max_examples)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(obj, range(n)), batch_size=batch_size)
        return list(loader)
    batches, seen = [], 0
    for batch in obj:
        batches.append(tuple(batch))
        seen += int(batch[0].shape[0])
        if max_examples and seen >= max_examples:
            break
    return batches


def _loss(spec: str | None, targets: torch.Tensor):
    if spec is None:
        spec = "ce" if not targets.is_floating_point() else "mse"
    if spec == "ce":
        return nn.CrossEntropyLoss()
    if spec == "mse":
        return nn.MSELoss()
    return load_object(spec)


def add_curvature_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``curvature`` sub-command to the ``steepest`` command's sub-parsers."""
    p = subparsers.add_parser(
        "curvature", help="top Hessian eigenvalues, trace, spectral density and loss-landscape plots of a model",
        description="Curvature of a model's loss: top eigenvalues (Lanczos), Hutchinson trace, spectral density "
                    "(stochastic Lanczos quadrature) and loss-landscape slices, written as PNG plots and JSON.")
    p.add_argument("model", help="module:factory or path/to/file.py:factory returning an nn.Module")
    p.add_argument("--data", default="digits",
                   help=f"built-in dataset ({', '.join(BUILTIN_DATASETS)}) or module:function returning (X, y) "
                        "tensors, a Dataset or an iterable of (inputs, targets) batches (default digits)")
    p.add_argument("--checkpoint", help="a state_dict file to load into the model")
    p.add_argument("--loss", help="ce, mse, or module:function (default: ce for integer targets, else mse)")
    p.add_argument("--operator", choices=("hessian", "ggn", "fisher"), default="hessian")
    p.add_argument("--params", help="comma-separated parameter names to restrict to (default: all trainable)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-examples", type=int, default=1024, help="use at most this many examples (0: all)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-4, help="Lanczos residual tolerance (relative)")
    p.add_argument("--trace-tol", type=float, default=0.05, help="relative standard error to stop the trace at")
    p.add_argument("--max-probes", type=int, default=100)
    p.add_argument("--density-probes", type=int, default=3)
    p.add_argument("--density-steps", type=int, default=40)
    p.add_argument("--landscape", choices=("1d", "2d", "none"), default="1d")
    p.add_argument("--points", type=int, default=21, help="points per landscape axis")
    p.add_argument("--eval", action="store_true", help="put the model in eval mode (default: as the factory left it)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="curvature_out", help="folder for density.png, landscape.png, curvature.json")
    p.set_defaults(func=run_curvature)
    return p


def run_curvature(args: argparse.Namespace) -> int:
    """Run the ``curvature`` sub-command; returns the exit code."""
    from . import (
        fisher,
        ggn,
        hessian,
        loss_slice_1d,
        loss_slice_2d,
        plot_slice_1d,
        plot_slice_2d,
        random_direction,
        spectral_density,
        top_eigenvalues,
        trace,
    )

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    factory = load_object(args.model)
    model = factory() if not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise SystemExit(f"error: {args.model} did not give an nn.Module (got {type(model).__name__})")
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    model = model.to(device=args.device, dtype=dtype)
    if args.eval:
        model.eval()
    raw = builtin_dataset(args.data, args.seed) if args.data in BUILTIN_DATASETS else load_object(args.data)
    if callable(raw) and not isinstance(raw, (torch.utils.data.Dataset, tuple)):
        raw = raw()
    batches = _batches(raw, args.batch_size, args.max_examples or None)
    if not batches:
        raise SystemExit("error: the data holds no batches")

    def move(t):
        if isinstance(t, torch.Tensor):
            t = t.to(args.device)
            return t.to(dtype) if t.is_floating_point() else t
        return t

    batches = [(move(x), move(y)) for x, y in batches]
    loss_fn = _loss(args.loss, batches[0][1])
    params = [s.strip() for s in args.params.split(",")] if args.params else None
    make = {"hessian": hessian, "ggn": ggn, "fisher": fisher}[args.operator]
    op = make(model, loss_fn, batches, params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_ex = sum(int(x.shape[0]) for x, _ in batches)
    print(f"{args.operator} of {type(model).__name__}: {op.shape[0]:,} parameters, {n_ex} examples "
          f"in {len(batches)} batches")
    loss, _ = op.loss_and_grad()
    print(f"loss            {loss:.6g}")
    t0 = time.perf_counter()
    vals, vecs = top_eigenvalues(op, k=args.top_k, tol=args.tol, seed=args.seed)
    t_eig = time.perf_counter() - t0
    print(f"top {args.top_k} eigenvalues " + ", ".join(f"{v:.6g}" for v in vals.tolist()) + f"   ({t_eig:.1f} s)")
    t0 = time.perf_counter()
    est = trace(op, tol=args.trace_tol, max_probes=args.max_probes, seed=args.seed)
    print(f"trace           {est.value:.6g} +- {est.stderr:.2g} ({est.probes} probes"
          f"{'' if est.converged else ', tolerance not reached'}; {time.perf_counter() - t0:.1f} s)")
    sd = spectral_density(op, num_probes=args.density_probes, steps=args.density_steps, seed=args.seed)
    sd.plot(str(out / "density.png"), title=f"{args.operator} spectral density (SLQ)")
    written = [out / "density.png"]
    result = {"operator": args.operator, "parameters": op.shape[0], "examples": n_ex, "loss": loss,
              "top_eigenvalues": vals.tolist(), "trace": est.value, "trace_stderr": est.stderr,
              "trace_probes": est.probes, "density_grid": sd.grid.tolist(), "density": sd.density.tolist()}
    if args.landscape != "none":
        alphas = torch.linspace(-1, 1, args.points, dtype=torch.float64)
        d_rand = random_direction(model, params, seed=args.seed)
        if args.landscape == "1d":
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            _, l_rand = loss_slice_1d(model, loss_fn, batches, d_rand, alphas, params)
            (u1,) = [op.unflatten(vecs[:, 0])]
            scale = float(sum(float(p.detach().norm()) ** 2 for p in op.params) ** 0.5) * 0.1
            _, l_eig = loss_slice_1d(model, loss_fn, batches, [t * scale for t in u1], alphas, params)
            plot_slice_1d(alphas, l_rand, ax=ax, label="filter-normalized random direction")
            plot_slice_1d(alphas, l_eig, ax=ax, label=f"top eigenvector (x {scale:.3g})",
                          title="loss landscape slices", path=str(out / "landscape.png"))
            plt.close(fig)
            result["landscape_1d"] = {"alphas": alphas.tolist(), "random": l_rand.tolist(), "eigen": l_eig.tolist()}
        else:
            d2 = random_direction(model, params, seed=args.seed + 1)
            _, _, L = loss_slice_2d(model, loss_fn, batches, d_rand, d2, alphas, alphas, params)
            plot_slice_2d(alphas, alphas, L, path=str(out / "landscape.png"),
                          title="loss surface (filter-normalized directions)")
            result["landscape_2d"] = L.tolist()
        written.append(out / "landscape.png")
    (out / "curvature.json").write_text(json.dumps(result))
    written.append(out / "curvature.json")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m steepest.curvature.cli``) until the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="steepest")
    add_curvature_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
