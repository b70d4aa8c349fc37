"""Speed and memory of the curvature instruments (not a test; prints ratios).

    python benchmarks/curvature_speed.py            # ~1M-parameter MLP and a small transformer
    python benchmarks/curvature_speed.py --small    # a quick run with small sizes

Prints, per model: Hessian-vector product time / gradient time (interleaved, best of several), the
same per column for a 4-column matrix product and for GGN products, peak memory of one HVP relative to
one gradient (peak RSS of fresh subprocesses on CPU, max_memory_allocated on CUDA), and the time to the
top eigenvalue (Lanczos, 1e-3 relative residual) and to the trace at 1% relative standard error.
PyHessian is not compared (it is not installed here; a comparison would run its code against ours on
the same model and data).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn

from steepest import curvature as C


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


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speed(name: str, small: bool, repeats: int) -> dict:
    model, loss_fn, data = make(name, small)
    H = C.hessian(model, loss_fn, data)
    G = C.ggn(model, loss_fn, data)
    n = H.shape[0]
    v = torch.randn(n)
    V = torch.randn(n, 4)
    grad = H.loss_and_grad
    # warm up, then interleave: grad, hvp, grad, hvp, ...
    grad(), H @ v, H @ V, G @ v
    tg, th, tm, tggn = [], [], [], []
    for _ in range(repeats):
        tg.append(_best(grad, 1))
        th.append(_best(lambda: H @ v, 1))
        tm.append(_best(lambda: H @ V, 1) / 4)
        tggn.append(_best(lambda: G @ v, 1))
    g = min(tg)
    return {"model": name, "params": n, "grad_ms": 1e3 * g, "hvp/grad": min(th) / g,
            "hvp_in_matmat4/grad": min(tm) / g, "ggn/grad": min(tggn) / g}


def accuracy_times(name: str, small: bool) -> dict:
    model, loss_fn, data = make(name, small)
    H = C.hessian(model, loss_fn, data)
    G = C.ggn(model, loss_fn, data)
    out = {}
    t0 = time.perf_counter()
    k0 = H.num_products
    vals, _ = C.top_eigenvalues(H, k=1, tol=1e-3)
    out["top_eig"] = float(vals[0])
    out["top_eig_s"] = time.perf_counter() - t0
    out["top_eig_hvps"] = H.num_products - k0
    for label, op in (("hessian", H), ("ggn", G)):
        t0 = time.perf_counter()
        est = C.trace(op, tol=0.01, max_probes=400 if small else 200, batch=8)
        out[f"trace_{label}"] = est.value
        out[f"trace_{label}_rel_se"] = est.stderr / abs(est.value)
        out[f"trace_{label}_probes"] = est.probes
        out[f"trace_{label}_s"] = time.perf_counter() - t0
    return out


_MEM_CHILD = """
import resource, sys, torch
sys.path.insert(0, {here!r})
from curvature_speed import make
from steepest import curvature as C
torch.manual_seed(0)
model, loss_fn, data = make({name!r}, {small!r})
H = C.hessian(model, loss_fn, data)
v = torch.randn(H.shape[0])
mode = {mode!r}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "grad":
    H.loss_and_grad()
elif mode == "hvp":
    H @ v
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def memory(name: str, small: bool) -> dict:
    if torch.cuda.is_available():  # pragma: no cover - CPU machine here
        model, loss_fn, data = make(name, small)
        model = model.cuda()
        data = [(x.cuda(), y.cuda()) for x, y in data]
        H = C.hessian(model, loss_fn, data)
        v = torch.randn(H.shape[0], device="cuda")
        res = {}
        for mode, fn in (("grad", H.loss_and_grad), ("hvp", lambda: H @ v)):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            res[mode] = torch.cuda.max_memory_allocated() - base
        return {"peak_hvp/grad": res["hvp"] / res["grad"], "how": "cuda max_memory_allocated"}
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    res = {}
    for mode in ("none", "grad", "hvp"):
        code = _MEM_CHILD.format(here=here, name=name, small=small, mode=mode)
        outp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        res[mode] = int(outp.stdout.strip().splitlines()[-1])  # KiB of peak-RSS growth
    g = res["grad"]
    if g < 4096:  # under 4 MiB of growth: allocator noise, no meaningful ratio
        return {"peak_hvp/grad": float("nan"), "grad_peak_MiB": g / 1024, "hvp_peak_MiB": res["hvp"] / 1024,
                "how": "peak RSS growth too small to measure at this size"}
    return {"peak_hvp/grad": res["hvp"] / g, "grad_peak_MiB": res["grad"] / 1024, "hvp_peak_MiB": res["hvp"] / 1024,
            "how": "peak RSS growth of a fresh process (CPU)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small sizes for a quick run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable ratios on a shared machine; 0: torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in ("mlp", "transformer"):
        row = speed(name, args.small, args.repeats)
        row.update(memory(name, args.small))
        row.update(accuracy_times(name, args.small))
        rows.append(row)
        if args.json:
            continue
        print(f"== {name}: {row['params']:,} parameters (gradient {row['grad_ms']:.1f} ms)")
        print(f"  HVP time / gradient time          {row['hvp/grad']:.2f}x   (target <= 2.5x)")
        print(f"  per column of a 4-column H @ V    {row['hvp_in_matmat4/grad']:.2f}x")
        print(f"  GGN product / gradient            {row['ggn/grad']:.2f}x")
        print(f"  peak memory HVP / gradient        {row['peak_hvp/grad']:.2f}x   ({row['how']}; "
              f"gradient {row['grad_peak_MiB']:.1f} MiB, HVP {row['hvp_peak_MiB']:.1f} MiB)")
        print(f"  top eigenvalue {row['top_eig']:.5g}: {row['top_eig_s']:.2f} s, {row['top_eig_hvps']} HVPs "
              "(Lanczos, residual 1e-3)")
        for label in ("hessian", "ggn"):
            conv = "" if row[f"trace_{label}_rel_se"] <= 0.01 else " (1% not reached)"
            print(f"  trace of the {label:7s} {row[f'trace_{label}']:.5g} +- "
                  f"{100 * row[f'trace_{label}_rel_se']:.2f}%: {row[f'trace_{label}_s']:.2f} s, "
                  f"{row[f'trace_{label}_probes']} probes{conv}")
    print("PyHessian comparison: skipped (not installed; see the module docstring).")
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
