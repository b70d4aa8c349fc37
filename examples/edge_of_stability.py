"""Edge of stability at small scale (Cohen, Kaur, Li, Kolter and Talwalkar 2021, "Gradient descent on
neural networks typically occurs at the edge of stability", arXiv 2103.00065).

Full-batch gradient descent with step size eta on a small tanh MLP (40 random points, MSE loss). The
sharpness (top Hessian eigenvalue), tracked every 10 steps by warm-started Lanczos, first rises
(progressive sharpening) and then hovers at 2/eta while the loss keeps falling, non-monotonically.

    python examples/edge_of_stability.py --etas 0.1 0.05 --steps 1500 --out eos.png
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from steepest import curvature as C


def run(eta: float, steps: int, seed: int = 0, every: int = 10):
    """Train with full-batch GD; return (tracker, losses)."""
    torch.manual_seed(seed)
    X = torch.randn(40, 4, dtype=torch.float64)
    Y = torch.randn(40, 1, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    loss_fn = nn.MSELoss()
    tracker = C.SharpnessTracker(model, loss_fn, (X, Y), every=every, tol=1e-3, max_iter=20)
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    losses = []
    for step in range(steps):
        tracker(step)
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return tracker, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etas", type=float, nargs="+", default=[0.1, 0.05])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="examples/edge_of_stability.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    for eta in args.etas:
        tr, losses = run(eta, args.steps)
        s = torch.tensor(tr.sharpness)
        late = s[torch.tensor(tr.steps) >= args.steps // 2]
        print(f"eta={eta:g}: 2/eta={2 / eta:.3g}  sharpness start {s[0]:.3g}, max {s.max():.3g}, "
              f"second half mean {late.mean():.4g} (min {late.min():.4g}, max {late.max():.4g}), "
              f"final loss {losses[-1]:.3g}, {sum(tr.products)} Hessian-vector products in {len(tr.steps)} "
              "measurements")
        (line,) = ax_s.plot(tr.steps, tr.sharpness, label=f"eta={eta:g}")
        ax_s.axhline(2 / eta, ls="--", color=line.get_color(), lw=0.8)
        ax_l.plot(losses, color=line.get_color(), label=f"eta={eta:g}")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss")
    ax_s.set_xlabel("step")
    ax_s.set_ylabel("sharpness (dashed: 2/eta)")
    ax_l.legend()
    ax_s.legend()
    fig.suptitle("Edge of stability: full-batch GD, tanh MLP, 40 points, MSE")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
