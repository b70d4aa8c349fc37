"""Train one small MLP on sklearn's digits with cosine, linear decay, WSD and a refined schedule; plot them.

    python examples/schedules.py --out schedules.png

The refined schedule (Defazio et al. 2023, arXiv 2310.07831) is built from the gradient norms the
linear-decay run recorded, as the paper does. Runs on a CPU in well under a minute.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from steepest import schedules as S


def data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr)), (torch.from_numpy(xte), torch.from_numpy(yte))


def train(make_sched, train_set, test_set, *, steps, lr, batch, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = make_sched(opt)
    x, y = train_set
    gen = torch.Generator().manual_seed(seed)
    losses, lrs, norms = [], [], []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).abs().sum()))  # l1: Adam
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(loss.item())
    with torch.no_grad():
        xt, yt = test_set
        logits = model(xt)
        test_loss = float(torch.nn.functional.cross_entropy(logits, yt))
        acc = float((logits.argmax(1) == yt).float().mean())
    return {"loss": np.array(losses), "lr": np.array(lrs), "norms": np.array(norms), "test_loss": test_loss,
            "acc": acc}


def smooth(v, k=25):
    return np.convolve(v, np.ones(k) / k, mode="valid")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="schedules.png")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    train_set, test_set = data()
    steps, warmup = args.steps, args.steps // 20
    runs = {
        "cosine": lambda o: S.cosine(o, warmup=warmup, total=steps),
        "linear decay": lambda o: S.linear_decay(o, warmup=warmup, total=steps),
        "WSD (1-sqrt, 20%)": lambda o: S.wsd(o, warmup=warmup, total=steps, decay=0.2, shape="1-sqrt"),
    }
    t0 = time.perf_counter()
    results = {name: train(make, train_set, test_set, steps=steps, lr=args.lr, batch=args.batch)
               for name, make in runs.items()}
    refined = S.refine_schedule(results["linear decay"]["norms"], tau=0.1, power=1.0)
    results["refined (from linear decay)"] = train(lambda o: S.from_schedule(o, refined), train_set, test_set,
                                                   steps=steps, lr=args.lr, batch=args.batch)
    elapsed = time.perf_counter() - t0

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_lr, ax_loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    print(f"{'schedule':<30} {'final train loss':>16} {'test loss':>10} {'test acc':>9}")
    for name, r in results.items():
        ax_lr.plot(r["lr"], label=name)
        ax_loss.plot(np.arange(len(smooth(r["loss"]))) + 12, smooth(r["loss"]), label=name)
        print(f"{name:<30} {r['loss'][-50:].mean():>16.4f} {r['test_loss']:>10.4f} {r['acc']:>9.4f}")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="AdamW learning rate")
    ax_loss.set(xlabel="step", ylabel="train loss (moving average)", yscale="log", title="MLP on digits")
    for ax in (ax_lr, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"{len(results)} runs of {steps} steps in {elapsed:.1f} s; plot written to {args.out}")


if __name__ == "__main__":
    main()
