"""First-step time of a fused optimizer on a machine that has never compiled (DESIGN.md section 5).

Each mode runs in a fresh process with an empty inductor cache (so the one-time compiler start-up counts, as
on a fresh machine): ``compile=True`` (the first step compiles, then runs) against ``compile="background"``
(steps run eager while a thread compiles). Prints the first step, the slowest step and the steps taken until
the fused kernel runs, and the steady step time after that.

    python benchmarks/first_step.py                       # AdamW, 16M params in 40 tensors
    python benchmarks/first_step.py --method lion --numel 4000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(method: str, numel: int, tensors: int, mode: str, limit_s: float) -> dict:
    import torch

    import steepest

    compile_mode = True if mode == "sync" else "background"
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel // tensors, generator=g) * 0.02) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    info = steepest.get(method)
    opt = info.cls(params, **{**info.example_kwargs, "lr": 1e-6, "compile": compile_mode})
    # A method that needs the loss (a Polyak step size) gets a constant one: the step's cost does not depend on it.
    closure = (lambda: torch.tensor(1.0)) if getattr(info.cls, "needs_closure", False) else None
    # A step ran fused when every call of its fused path had a kernel update every tensor of its plan (a kernel
    # in opt._kernels may be None: its compile failed, and the steps run eager). The calls are recorded through
    # a wrapper on this optimizer only (well under a microsecond a call).
    fused_path, calls = opt._run_fused, []

    def recorded(params, grads, states, scalars, wd, plan, *args, **kwargs):
        done = fused_path(params, grads, states, scalars, wd, plan, *args, **kwargs)
        calls.append(bool(plan.order) and set(done) >= set(plan.order))
        return done

    opt._run_fused = recorded
    start, times = time.perf_counter(), []
    fused_after = None
    while time.perf_counter() - start < limit_s:
        calls.clear()
        t = time.perf_counter()
        opt.step(closure)
        times.append(time.perf_counter() - t)
        if fused_after is None and opt._kernels and not opt._compile_jobs:
            if any(k is None for k in opt._kernels.values()):
                break  # a kernel's compile failed: the steps stay eager, and waiting longer changes nothing
            if calls and all(calls):
                fused_after = len(times)  # this step ran fused
        if fused_after is not None and len(times) >= fused_after + 5:
            break
    return {"first_s": times[0], "max_s": max(times), "steps_until_fused": fused_after,
            "until_fused_s": sum(times[:fused_after]) if fused_after else None,
            "steady_ms": 1e3 * statistics.median(times[-5:])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="adamw")
    ap.add_argument("--numel", type=int, default=16 * 2**20)
    ap.add_argument("--tensors", type=int, default=40)
    ap.add_argument("--limit", type=float, default=120.0, help="seconds per mode at most")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.method, args.numel, args.tensors, args.child, args.limit)))
        return
    print(f"{args.method}, {args.numel / 1e6:.1f}M float32 params in {args.tensors} tensors, empty inductor cache")
    print(f"{'mode':11s} {'first s':>8s} {'max s':>7s} {'steps to fused':>15s} {'s to fused':>11s} {'fused ms':>9s}")
    for mode in ("sync", "background"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--method", args.method, "--numel",
                                  str(args.numel), "--tensors", str(args.tensors), "--limit", str(args.limit)],
                                 env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        until = f"{r['until_fused_s']:.1f}" if r["until_fused_s"] is not None else "-"
        steps = str(r["steps_until_fused"]) if r["steps_until_fused"] is not None else "never"
        print(f"{mode:11s} {r['first_s']:8.2f} {r['max_s']:7.2f} {steps:>15s} {until:>11s} {r['steady_ms']:9.2f}",
              flush=True)


if __name__ == "__main__":
    main()
