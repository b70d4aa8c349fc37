"""Step time of one optimizer in a process of its own, as a training script runs it (DESIGN.md section 5).

benchmarks/step_speed.py times every candidate interleaved in one process, which keeps the C allocator's heap
grown by the others: there, a step whose temporaries are several MB never pays for giving them back to the OS
and page-faulting them in again. Here each case runs alone in a fresh process (warm-up steps, then the median of
the timed ones), against torch.optim.AdamW's default step (a loop over the tensors on the CPU) on the same
tensors, also alone; the ratio divides the two medians, so it is less sharp than an interleaved one (this VM:
+-10%).

Cases (16.8M or 38.6M parameters):

* ``bf16``: 40 bfloat16 matrices 410 x 1023, float32 states (steepest's default for 16-bit params), eager;
* ``bf16-states``: the same with bfloat16 states, round-to-nearest and stochastic rounding, eager and fused;
* ``embedding``: one float32 matrix 50257 x 768, eager, for AdamW, Adan, Lion, DoG, Prodigy, D-Adapt Adam,
  AdaTAMW, AdamP and Gravity.

    python benchmarks/solo_step.py                 # every case
    python benchmarks/solo_step.py --case embedding --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = {
    "bf16": [("torch adamw", {}), ("adamw", {"compile": False})],
    "bf16-states": [("torch adamw", {}), ("adamw", {"compile": False, "state": "bf16", "sr": False}),
                    ("adamw", {"compile": False, "state": "bf16", "sr": True}),
                    ("adamw", {"compile": True, "state": "bf16", "sr": False}),
                    ("adamw", {"compile": True, "state": "bf16", "sr": True})],
    "embedding": [("torch adamw", {})] + [(m, {"compile": False}) for m in
                                          ("adamw", "adan", "lion", "dog", "prodigy", "dadapt_adam", "adatamw",
                                           "adamp", "gravity")],
}


def child(case: str, method: str, opts: dict, steps: int) -> dict:
    import warnings

    import torch

    import steepest

    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    if case == "embedding":
        shapes, dtype = [(50257, 768)], torch.float32
    else:
        shapes, dtype = [(410, 1023)] * 40, torch.bfloat16
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
    if method == "torch adamw":
        opt = torch.optim.AdamW(params, lr=1e-3)
    else:
        info = steepest.get(method)
        kwargs = {**info.example_kwargs, "compile": opts["compile"]}
        if opts.get("state") == "bf16":
            kwargs.update(state_dtype=torch.bfloat16, stochastic_rounding=opts["sr"])
        opt = info.cls(params, **kwargs)
    times = []
    for _ in range(steps + 3):
        t = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times[3:])}


def label(method: str, opts: dict) -> str:
    if method == "torch adamw":
        return "torch.optim.AdamW()"
    parts = [method, "fused" if opts["compile"] else "eager"]
    if opts.get("state") == "bf16":
        parts.append("bf16 states, " + ("SR" if opts["sr"] else "RNE"))
    return " ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        case, method, opts = json.loads(args.child)
        print(json.dumps(child(case, method, opts, args.steps)))
        return
    for case in args.case or list(CASES):
        print(f"\n{case}: each in a process of its own, median ms of {args.steps} steps after 3")
        base = None
        for method, opts in CASES[case]:
            spec = json.dumps([case, method, opts])
            out = subprocess.run([sys.executable, __file__, "--child", spec, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            ms = json.loads(out.stdout.strip().splitlines()[-1])["ms"]
            base = ms if base is None else base
            print(f"  {label(method, opts):40s} {ms:8.2f} ms   / torch.optim.AdamW() {ms / base:5.2f}", flush=True)


if __name__ == "__main__":
    main()
