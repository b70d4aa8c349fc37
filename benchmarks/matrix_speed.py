"""Matrix and curvature-aware optimizers on a transformer-shaped parameter set.

Prints, per method: the mean step time over a window that contains its preconditioner refreshes at
their default frequency (the amortized cost), that time relative to steepest.AdamW and to
torch.optim.AdamW's default on the same parameters (timed interleaved in one run), the slowest single
step (a refresh), and the optimizer-state bytes per parameter actually allocated.

Gradients are fixed random tensors (the step cost does not depend on their values). Hessian methods
(AdaHessian, SophiaH, OASIS) need a closure with a graph and are timed in the training mode only.

``--train`` times whole training steps instead (forward, backward, optimizer step) of a causal transformer
language model with those blocks on ``--batch`` x ``--context`` random tokens, each method's window against
an AdamW window of the same length run right after it on the same model: the overhead a user sees per
training step. The Hessian methods' closure builds the double-backward graph only when
``create_graph_due()`` says so; K-FAC and MKOR get the model.

    python benchmarks/matrix_speed.py                      # 4 blocks of d=256, optimizer step only
    python benchmarks/matrix_speed.py --blocks 12 --dim 512 --steps 40
    python benchmarks/matrix_speed.py --train --blocks 4 --dim 256 --batch 16 --context 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import steepest
from steepest.optim.muon import muon_param_groups


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


class Block(nn.Module):
    """Pre-norm causal self-attention and a 4x MLP, written with nn.Linear layers (so K-FAC hooks all four)."""

    def __init__(self, dim: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CausalLM(nn.Module):
    """Token embedding, learned positions, ``blocks`` Blocks, final norm and a 256-token head."""

    def __init__(self, blocks: int, dim: int, context: int, vocab: int = 256):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(0.02 * torch.randn(context, dim))
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(blocks)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.norm(self.blocks(self.emb(idx) + self.pos[: idx.shape[1]])))


TRAIN_METHODS = {
    "adamw": lambda m: steepest.AdamW(m.parameters(), lr=1e-4),
    "shampoo": lambda m: steepest.Shampoo(m.parameters(), lr=1e-4),
    "soap": lambda m: steepest.SOAP(m.parameters(), lr=1e-4),
    "muon": lambda m: steepest.Muon(muon_param_groups(m), lr=1e-4),
    "scale": lambda m: steepest.SCALE(m.parameters(), lr=1e-4),
    "kfac": lambda m: steepest.KFAC(m, lr=1e-4),
    "mkor": lambda m: steepest.MKOR(m, lr=1e-4),
    "mfac": lambda m: steepest.MFAC(m.parameters(), lr=1e-4, ngrads=32),
    "adahessian": lambda m: steepest.AdaHessian(m.parameters(), lr=1e-4),
    "sophiah": lambda m: steepest.SophiaH(m.parameters(), lr=1e-4),
}
_REFRESH_KEYS = ("precondition_frequency", "T_inv", "inv_freq", "hessian_interval")


def train_steps(model, opt, batches) -> list[float]:
    """Seconds per training step (forward, backward, step) over ``batches``."""
    graph = getattr(opt, "needs_closure", False)
    due = getattr(opt, "create_graph_due", None)
    out = []
    for x in batches:
        t = time.perf_counter()
        if graph:
            def closure(x=x):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
                loss.backward(create_graph=due is None or due())
                return loss
            opt.step(closure)
        else:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            opt.step()
        out.append(time.perf_counter() - t)
    return out


def main_train(args) -> None:
    torch.manual_seed(0)
    model = CausalLM(args.blocks, args.dim, args.context)
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (args.batch, args.context + 1), generator=g) for _ in range(8)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; causal LM, {args.blocks} blocks of "
          f"d={args.dim}: {n / 1e6:.2f}M params; {args.batch} x {args.context} tokens per step")
    names = args.only.split(",") if args.only else list(TRAIN_METHODS)
    head = (f"{'method':10s} {'window':>6s} {'ms/step':>9s} {'AdamW ms/step':>14s} {'ratio':>6s} {'max ms':>8s} "
            f"{'state B/p':>9s}")
    print(head)
    print("-" * len(head))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for name in names:
        model.load_state_dict(init)
        opt = TRAIN_METHODS[name](model)
        refresh = max([int(opt.param_groups[0].get(k, 0) or 0) for k in _REFRESH_KEYS] + [1])
        window = max(args.steps, refresh + 5)
        plan = [batches[i % len(batches)] for i in range(window)]
        train_steps(model, opt, plan[:2])
        times = train_steps(model, opt, plan)
        state = state_bytes_per_param(opt, list(model.parameters()))
        del opt
        model.load_state_dict(init)
        ref = TRAIN_METHODS["adamw"](model)
        train_steps(model, ref, plan[:2])
        ref_times = train_steps(model, ref, plan)
        del ref
        mean_ms, ref_ms = statistics.fmean(times) * 1e3, statistics.fmean(ref_times) * 1e3
        print(f"{name:10s} {window:6d} {mean_ms:9.1f} {ref_ms:14.1f} {mean_ms / ref_ms:6.2f} {max(times) * 1e3:8.0f} "
              f"{state:9.1f}", flush=True)


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
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(TRAIN_METHODS))
    ap.add_argument("--train", action="store_true", help="time whole training steps of a causal transformer LM")
    ap.add_argument("--batch", type=int, default=16, help="--train: sequences per step")
    ap.add_argument("--context", type=int, default=128, help="--train: tokens per sequence")
    args = ap.parse_args(argv)
    if args.train:
        return main_train(args)
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
