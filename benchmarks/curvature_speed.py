"""Speed and memory of the curvature instruments (not a test; prints ratios).

    python benchmarks/curvature_speed.py            # ~1M-parameter MLP and a small transformer
    python benchmarks/curvature_speed.py --small    # a quick run with small sizes
    # side by side with PyHessian (pip install pyhessian in a scratch venv that has torch, then):
    PYTHONPATH=src /path/to/scratch/venv/bin/python benchmarks/curvature_speed.py

Prints, per model: Hessian-vector product time / gradient time, as a user calls ``H @ v`` (interleaved,
best of several): the first product (forward pass + first derivative with create_graph + one more
backward pass) and later ones (the operator keeps the first derivative's graph for one-batch data,
so only the last backward pass is repeated); the same per column of a 4-column ``H @ V`` and for GGN
products; the peak memory of an HVP relative to a gradient (allocator-level: torch.profiler's
allocation events on CPU, max_memory_allocated on CUDA), and the memory the kept graph holds between
products; the time to the top eigenvalue (Lanczos, 1e-3 relative residual; and power iteration
with PyHessian's stopping rule) and to the trace at 1% relative standard error, and, where PyHessian
is importable, its top eigenvalue (power iteration, its defaults) and trace (Hutchinson, its defaults)
on the same model and data. PyHessian is not a dependency of steepest.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from steepest import curvature as C

try:
    from pyhessian import hessian as pyhessian_hessian
except ImportError:  # not installed: the comparison is skipped
    pyhessian_hessian = None


class TinyGPTBlock(nn.Module):
    """Token embedding + ``layers`` pre-norm transformer blocks + LM head, next-token loss."""

    def __init__(self, vocab=64, d=128, heads=4, layers=2, ctx=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        h = self.emb(x) + self.pos[:t]
        return self.head(self.blocks(h, mask=self.mask[:t, :t], is_causal=True)).transpose(1, 2)


def make(name: str, small: bool):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        din, hid = (64, 128) if small else (256, 768)
        model = nn.Sequential(nn.Linear(din, hid), nn.GELU(), nn.Linear(hid, hid), nn.GELU(), nn.Linear(hid, 10))
        n = 256 if small else 1024
        X, Y = torch.randn(n, din, generator=g), torch.randint(0, 10, (n,), generator=g)
    else:
        d, ctx = (32, 16) if small else (128, 64)
        model = TinyGPTBlock(d=d, heads=4, layers=2, ctx=ctx)
        n = 16 if small else 32
        X = torch.randint(0, 64, (n, ctx), generator=g)
        Y = torch.roll(X, -1, dims=1)
    return model, nn.CrossEntropyLoss(), [(X, Y)]


def speed(name: str, small: bool, repeats: int) -> dict:
    model, loss_fn, data = make(name, small)
    H = C.hessian(model, loss_fn, data)
    G = C.ggn(model, loss_fn, data)
    n = H.shape[0]
    v = torch.randn(n)
    V = torch.randn(n, 4)
    grad = H.loss_and_grad

    def first():  # as a user's first product (or any product on data of several batches): nothing kept
        H.clear_cache()
        return H @ v

    def first_ggn():
        G.clear_cache()
        return G @ v

    cases = {"grad": grad, "hvp_first": first, "hvp_later": lambda: H @ v, "hvp_matmat4": lambda: H @ V,
             "ggn_first": first_ggn, "ggn_later": lambda: G @ v}
    for fn in cases.values():  # warm up
        fn()
    best = dict.fromkeys(cases, math.inf)
    for _ in range(repeats):  # interleaved: grad, first, later, ..., grad, first, later, ...
        for key, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    g = best["grad"]
    return {"model": name, "params": n, "grad_ms": 1e3 * g, "hvp_first/grad": best["hvp_first"] / g,
            "hvp/grad": best["hvp_later"] / g, "hvp_in_matmat4/grad": best["hvp_matmat4"] / 4 / g,
            "ggn_first/grad": best["ggn_first"] / g, "ggn/grad": best["ggn_later"] / g}


def _cpu_peak(fn) -> tuple[int, int]:
    """(peak, net) bytes allocated by torch on the CPU during ``fn()``, from the profiler's allocation
    events (each allocation and free, in time order): the allocator's view, not the process RSS."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, cur


def memory(name: str, small: bool) -> dict:
    model, loss_fn, data = make(name, small)
    cuda = torch.cuda.is_available()
    if cuda:
        model = model.cuda()
        data = [(x.cuda(), y.cuda()) for x, y in data]
    H = C.hessian(model, loss_fn, data)
    v = torch.randn(H.shape[0], device=H.device)
    H.loss_and_grad(), H @ v  # warm up (first-call allocations of the library, not of the product)
    H.clear_cache()

    def measure(fn) -> tuple[int, int]:
        if not cuda:
            return _cpu_peak(fn)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base

    grad_peak, _ = measure(H.loss_and_grad)
    first_peak, held = measure(lambda: H @ v)  # builds and keeps the graph: 'held' stays allocated
    later_peak, _ = measure(lambda: H @ v)
    mib = 2.0 ** 20
    return {"peak_hvp_first/grad": first_peak / grad_peak, "peak_hvp/grad": (held + later_peak) / grad_peak,
            "grad_peak_MiB": grad_peak / mib, "hvp_first_peak_MiB": first_peak / mib, "held_MiB": held / mib,
            "hvp_later_peak_MiB": later_peak / mib,
            "how": "cuda max_memory_allocated" if cuda else "torch.profiler allocation events, CPU"}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def accuracy_times(name: str, small: bool) -> dict:
    model, loss_fn, data = make(name, small)
    out = {}
    H = C.hessian(model, loss_fn, data)  # a fresh operator each time: the times include building the graph
    (vals, _), out["top_eig_s"] = _timed(lambda: C.top_eigenvalues(H, k=1, tol=1e-3))
    out["top_eig"], out["top_eig_hvps"] = float(vals[0]), H.num_products
    H = C.hessian(model, loss_fn, data)
    (vals, _), out["power_s"] = _timed(lambda: C.top_eigenvalues(H, k=1, method="power", tol=1e-3,
                                                                 max_iter=100))
    out["power"], out["power_hvps"] = float(vals[0]), H.num_products
    H = C.hessian(model, loss_fn, data)
    (vals, _), out["ref_s"] = _timed(lambda: C.top_eigenvalues(H, k=1, tol=1e-7, max_iter=300))
    out["ref"], out["ref_hvps"] = float(vals[0]), H.num_products
    for label, make_op in (("hessian", C.hessian), ("ggn", C.ggn)):
        op = make_op(model, loss_fn, data)
        est, out[f"trace_{label}_s"] = _timed(lambda op=op: C.trace(op, tol=0.01, max_probes=400 if small else 200,
                                                                            batch=8))
        out[f"trace_{label}"] = est.value
        out[f"trace_{label}_rel_se"] = est.stderr / abs(est.value)
        out[f"trace_{label}_probes"] = est.probes
    return out


def pyhessian_times(name: str, small: bool, probes: int) -> dict:
    """PyHessian (Yao et al. 2020, arXiv 1912.07145) with its defaults on a copy of the same model and
    data: power iteration (maxIter=100, tol=1e-3 relative change) and Hutchinson (maxIter=100, tol=1e-3
    relative change of the running mean). Its construction (forward + backward with create_graph) is
    timed with each. Also its trace with as many probes as steepest's trace took to reach 1% (tol=-1:
    no early stop), i.e. the same estimator to the same accuracy. Run under the math attention kernel:
    PyHessian's double backward fails on the fused CPU attention kernel that nn.TransformerEncoderLayer
    calls (steepest switches kernels itself)."""
    ph_module = sys.modules[pyhessian_hessian.__module__]  # the module (its package exports the class by this name)

    model, loss_fn, data = make(name, small)
    (X, Y), = data
    out = {}
    count = [0]
    hvp = ph_module.hessian_vector_product

    def counted(*args, **kwargs):
        count[0] += 1
        return hvp(*args, **kwargs)

    ph_module.hessian_vector_product = counted
    try:
        with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")  # its .grad cycle
            torch.manual_seed(0)
            m = copy.deepcopy(model)
            (vals, _), out["ph_top_eig_s"] = _timed(
                lambda: pyhessian_hessian(m, loss_fn, data=(X, Y), cuda=False).eigenvalues())
            out["ph_top_eig"], out["ph_top_eig_hvps"] = float(vals[0]), count[0]
            for key, kw in (("ph_trace", {}), ("ph_trace_same", {"maxIter": probes, "tol": -1.0})):
                torch.manual_seed(0)
                m = copy.deepcopy(model)
                samples, out[f"{key}_s"] = _timed(
                    lambda kw=kw, m=m: pyhessian_hessian(m, loss_fn, data=(X, Y), cuda=False).trace(**kw))
                s = torch.tensor(samples, dtype=torch.float64)
                out[key] = float(s.mean())
                out[f"{key}_rel_se"] = float(s.std() / math.sqrt(len(s)) / s.mean().abs()) if len(s) > 1 else math.nan
                out[f"{key}_probes"] = len(s)
    finally:
        ph_module.hessian_vector_product = hvp
    return out


def report(row: dict) -> None:
    print(f"== {row['model']}: {row['params']:,} parameters (gradient {row['grad_ms']:.1f} ms)")
    print(f"  HVP / gradient, first product      {row['hvp_first/grad']:.2f}x   (forward + first derivative + product)")
    print(f"  HVP / gradient, later products     {row['hvp/grad']:.2f}x   (kept graph; target <= 2.5x)")
    print(f"  per column of a 4-column H @ V     {row['hvp_in_matmat4/grad']:.2f}x")
    print(f"  GGN product / gradient             {row['ggn_first/grad']:.2f}x first, {row['ggn/grad']:.2f}x later")
    print(f"  peak memory HVP / gradient         {row['peak_hvp_first/grad']:.2f}x first product, "
          f"{row['peak_hvp/grad']:.2f}x later (kept graph included)   ({row['how']})")
    print(f"    gradient {row['grad_peak_MiB']:.1f} MiB; first HVP {row['hvp_first_peak_MiB']:.1f} MiB, of which "
          f"{row['held_MiB']:.1f} MiB stay kept; later HVP {row['hvp_later_peak_MiB']:.1f} MiB above that")
    print(f"  {'':34s} {'value':>11s} {'seconds':>8s} {'HVPs':>5s}  accuracy")
    print(f"  {'top eigenvalue, steepest Lanczos':34s} {row['top_eig']:11.5g} {row['top_eig_s']:8.2f} "
          f"{row['top_eig_hvps']:5d}  residual <= 1e-3 relative")
    print(f"  {'top eigenvalue, steepest power':34s} {row['power']:11.5g} {row['power_s']:8.2f} "
          f"{row['power_hvps']:5d}  change < 1e-3 relative (PyHessian's rule)")
    if "ph_top_eig" in row:
        print(f"  {'top eigenvalue, PyHessian power':34s} {row['ph_top_eig']:11.5g} {row['ph_top_eig_s']:8.2f} "
              f"{row['ph_top_eig_hvps']:5d}  its defaults (maxIter 100, tol 1e-3)")
    print(f"  {'top eigenvalue, reference':34s} {row['ref']:11.5g} {row['ref_s']:8.2f} {row['ref_hvps']:5d}  "
          "steepest Lanczos, residual <= 1e-7 relative")
    for label in ("hessian", "ggn"):
        conv = "" if row[f"trace_{label}_rel_se"] <= 0.01 else ", 1% not reached"
        print(f"  {'trace of the ' + label + ', steepest':34s} {row[f'trace_{label}']:11.5g} "
              f"{row[f'trace_{label}_s']:8.2f} {row[f'trace_{label}_probes']:5d}  "
              f"{100 * row[f'trace_{label}_rel_se']:.2f}% standard error{conv}")
    if "ph_trace" in row:
        print(f"  {'trace of the hessian, PyHessian':34s} {row['ph_trace']:11.5g} {row['ph_trace_s']:8.2f} "
              f"{row['ph_trace_probes']:5d}  {100 * row['ph_trace_rel_se']:.2f}% standard error "
              "(its defaults: stop at 1e-3 change of the mean)")
        print(f"  {'trace of the hessian, PyHessian':34s} {row['ph_trace_same']:11.5g} {row['ph_trace_same_s']:8.2f} "
              f"{row['ph_trace_same_probes']:5d}  {100 * row['ph_trace_same_rel_se']:.2f}% standard error "
              "(as many probes as steepest)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small sizes for a quick run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable ratios on a shared machine; 0: torch's default)")
    ap.add_argument("--models", default="mlp,transformer")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        row = speed(name, args.small, args.repeats)
        row.update(memory(name, args.small))
        row.update(accuracy_times(name, args.small))
        if pyhessian_hessian is not None and not torch.cuda.is_available():
            row.update(pyhessian_times(name, args.small, row["trace_hessian_probes"]))
        rows.append(row)
        if not args.json:
            report(row)
    if pyhessian_hessian is None:
        print("pyhessian not installed: no comparison (see the module docstring)")
    elif torch.cuda.is_available():
        print("PyHessian comparison: run on CPU only here")
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
