"""Matrix and curvature-aware optimizers on a transformer-shaped parameter set.

Prints, per method: the mean step time over a window that contains its preconditioner refreshes at
their default frequency (the amortized cost), that time relative to steepest.AdamW and to
torch.optim.AdamW's default on the same parameters (timed interleaved in one run), the slowest single
step (a refresh), and the optimizer-state bytes per parameter actually allocated.

Gradients are fixed random tensors (the step cost does not depend on their values). Hessian methods
(AdaHessian, SophiaH, OASIS) need a closure with a graph and are timed by benchmarks/curvature_speed.py
instead.

    python benchmarks/matrix_speed.py                      # 4 blocks of d=256
    python benchmarks/matrix_speed.py --blocks 12 --dim 512 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import steepest


def transformer_params(blocks: int, dim: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """qkv, attention output, two MLP matrices and two norm gains per block, plus biases."""
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for _ in range(blocks):
        shapes += [(3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim),
                   (dim,), (dim,), (dim,)]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
        p.grad = torch.randn(s, generator=g) * 1e-3
        params.append(p)
    return params


METHODS = {
    "adamw": lambda ps: steepest.AdamW(ps, lr=1e-4),
    "shampoo": lambda ps: steepest.Shampoo(ps, lr=1e-4),
    "soap": lambda ps: steepest.SOAP(ps, lr=1e-4),
    "muon": lambda ps: steepest.Muon(ps, lr=1e-4),
    "scale": lambda ps: steepest.SCALE(ps, lr=1e-4),
    "mfac": lambda ps: steepest.MFAC(ps, lr=1e-4, ngrads=32),
}


def state_bytes_per_param(opt, params) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30,
                    help="timed steps per method after 2 warm-up steps (at least its refresh frequency + 10)")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(METHODS))
    args = ap.parse_args(argv)
    params = transformer_params(args.blocks, args.dim)
    n = sum(p.numel() for p in params)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.blocks} blocks of d={args.dim}: "
          f"{n / 1e6:.2f}M params in {len(params)} tensors; {args.steps} timed steps each")
    names = args.only.split(",") if args.only else list(METHODS)
    ref = torch.optim.AdamW(params, lr=1e-4)
    ref.step()
    head = (f"{'method':9s} {'mean ms':>9s} {'max ms':>9s} {'/steepest.AdamW':>16s} {'/torch AdamW':>13s} "
            f"{'state B/p':>9s}")
    print(head)
    print("-" * len(head))
    base_ms = None
    for name in names:
        opt = METHODS[name](params)
        for _ in range(2):
            opt.step()
        # The window spans at least one preconditioner refresh at the method's default frequency.
        freq = int(opt.param_groups[0].get("precondition_frequency", 0) or 0)
        window = max(args.steps, freq + 10)
        times, ref_times = [], []
        for _ in range(window):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref.step()
            ref_times.append(time.perf_counter() - t)
        mean_ms = statistics.fmean(times) * 1e3
        ref_ms = statistics.median(ref_times) * 1e3
        if name == "adamw":
            base_ms = mean_ms
        rel = f"{mean_ms / base_ms:16.2f}" if base_ms else f"{'-':>16s}"
        print(f"{name:9s} {mean_ms:9.2f} {max(times) * 1e3:9.1f} {rel} {mean_ms / ref_ms:13.2f} "
              f"{state_bytes_per_param(opt, params):9.1f}", flush=True)
        del opt


if __name__ == "__main__":
    main()
