"""The built-in workloads of ``steepest bench``: small, CPU-sized, data made by code or shipped with scikit-learn.

Kinds follow DeepOBS (Schneider et al. 2019, arXiv 1903.05499) and AlgoPerf (Dahl et al. 2023,
arXiv 2306.07179), scaled down: a noisy ill-conditioned quadratic (DeepOBS ``quadratic_deep``), noisy
Rosenbrock, logistic and softmax regression, an MLP, a CNN and an autoencoder on scikit-learn's bundled
digits / breast-cancer data (few examples, label noise, held-out split), low-rank matrix completion, and
character-level language models (Transformer, GRU) on text from a seeded order-2 Markov source whose
entropy rate -- the best possible validation loss -- is known in closed form.

Budgets and targets are read from the frozen ``targets_v<N>.json`` beside this file (see
``steepest bench targets``); a workload missing there has ``target=None`` and a provisional budget.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Workload, builtin, frozen_targets

DATA_SEED = 20240601  # data are fixed per workload version; the trial seed only moves init and minibatches


def _frozen(name: str, search_budget: int, eval_every: int) -> dict:
    entry = frozen_targets()["workloads"].get(name, {})
    return dict(version=int(frozen_targets()["version"]), budget=int(entry.get("budget", search_budget // 2)),
                target=entry.get("target"), eval_every=int(entry.get("eval_every", eval_every)),
                search_budget=search_budget)


def _index_batch(n: int, size: int):
    def batch(gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, n, (size,), generator=gen)
    return batch


class _Vector(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(init)


# --------------------------------------------------------------------------------------------- quadratic
@lru_cache(maxsize=1)
def _quadratic_data(dim: int = 100):
    rng = np.random.default_rng(DATA_SEED)
    eig = np.concatenate([rng.uniform(0.0, 1.0, dim - dim // 10), rng.uniform(30.0, 60.0, dim // 10)]) / 60.0
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return torch.tensor((q * eig) @ q.T, dtype=torch.float32)


@builtin
def quadratic_deep() -> Workload:
    """Noisy ill-conditioned quadratic, DeepOBS ``quadratic_deep`` (Schneider et al. 2019, arXiv 1903.05499).

    loss = mean_i 1/2 (theta - x_i)^T Q (theta - x_i), x_i ~ N(0, I), Q = R diag(lambda) R^T with 90% of
    eigenvalues in [0, 1] and 10% in [30, 60], all divided by 60 (so that lambda_max = 1 suits
    the momentum search space). Validation metric: the excess loss 1/2 theta^T Q theta
    (optimum 0, at theta = 0).
    """
    Q = _quadratic_data()
    dim = Q.shape[0]

    def build(seed: int) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        return _Vector(torch.randn(dim, generator=g))

    def batch(gen):
        return torch.randn(32, dim, generator=gen)

    def loss(model, x):
        d = model.theta - x
        return 0.5 * ((d @ Q) * d).sum(1).mean()

    def evaluate(model):
        t = model.theta
        return float(0.5 * t @ Q @ t)

    return Workload(name="quadratic_deep", kind="noisy quadratic", description=quadratic_deep.__doc__.split("\n")[0],
                    build=build, batch=batch, loss=loss, evaluate=evaluate, metric="excess loss", mode="min",
                    optimum=0.0, **_frozen("quadratic_deep", 400, 10))


# --------------------------------------------------------------------------------------------- rosenbrock
@builtin
def rosenbrock() -> Workload:
    """Noisy 2-D Rosenbrock valley f(x, y) = ((1 - x)^2 + 100 (y - x^2)^2) / 100 (Rosenbrock 1960).

    Scaled by 1/100 so that the curvature at the start suits the momentum search space. Each step sees
    f(theta) + 0.02 xi^T theta, xi ~ N(0, I) (unbiased gradient noise). Start near (-1.2, 1).
    Validation metric: f(theta) (optimum 0 at (1, 1)).
    """
    def f(t):
        return 0.01 * (1 - t[0]) ** 2 + (t[1] - t[0] ** 2) ** 2

    def build(seed):
        g = torch.Generator().manual_seed(seed)
        return _Vector(torch.tensor([-1.2, 1.0]) + 0.05 * torch.randn(2, generator=g))

    def batch(gen):
        return torch.randn(2, generator=gen)

    def loss(model, xi):
        return f(model.theta) + 0.02 * (xi * model.theta).sum()

    return Workload(name="rosenbrock", kind="noisy Rosenbrock", description=rosenbrock.__doc__.split("\n")[0],
                    build=build, batch=batch, loss=loss, evaluate=lambda m: float(f(m.theta)),
                    metric="f(theta)", mode="min", optimum=0.0, **_frozen("rosenbrock", 1000, 20))


# --------------------------------------------------------------------------------------------- tabular
def _split(x, y, n_train, noise, n_classes, sd_floor=0.0):
    rng = np.random.default_rng(DATA_SEED)
    perm = rng.permutation(len(x))
    x, y = x[perm], y[perm]
    # Standardize by the training split's statistics only; the floor keeps near-constant pixels bounded.
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0)
    x = (x - mu) / np.maximum(sd, max(sd_floor, 1e-3 * sd.max()))
    ytr = y[:n_train].copy()
    flip = rng.random(n_train) < noise
    ytr[flip] = (ytr[flip] + rng.integers(1, n_classes, flip.sum())) % n_classes
    t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return t(x[:n_train], torch.float32), t(ytr, torch.long), t(x[n_train:], torch.float32), t(y[n_train:], torch.long)


@lru_cache(maxsize=1)
def _cancer():
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    return _split(d.data, d.target, 80, 0.15, 2)


@lru_cache(maxsize=2)
def _digits(n_train: int, noise: float):
    from sklearn.datasets import load_digits
    d = load_digits()
    return _split(d.data / 16.0, d.target, n_train, noise, 10, sd_floor=0.25)


def _classifier(name, kind, desc, data, make, budget, eval_every, metric="val error", batch_size=32):
    xtr, ytr, xva, yva = data

    def build(seed):
        torch.manual_seed(seed)
        return make()

    def loss(model, idx):
        return F.cross_entropy(model(xtr[idx]), ytr[idx])

    def evaluate(model):
        out = model(xva)
        if metric == "val error":
            return float((out.argmax(1) != yva).float().mean())
        return float(F.cross_entropy(out, yva))

    return Workload(name=name, kind=kind, description=desc, build=build, batch=_index_batch(len(xtr), batch_size),
                    loss=loss, evaluate=evaluate, metric=metric, mode="min", **_frozen(name, budget, eval_every))


@builtin
def logreg_cancer() -> Workload:
    """Logistic regression on breast_cancer (Wolberg et al. 1995, via scikit-learn): 80 train, 15% flipped labels.

    Validation metric: cross-entropy on the 489 clean held-out examples.
    """
    return _classifier("logreg_cancer", "logistic regression", logreg_cancer.__doc__.split("\n")[0], _cancer(),
                       lambda: nn.Linear(30, 2), 300, 10, metric="val loss", batch_size=16)


@builtin
def softmax_digits() -> Workload:
    """Softmax regression on digits (Alpaydin & Kaynak 1998, via scikit-learn): 300 train, 20% flipped labels.

    Validation metric: cross-entropy on the 1497 clean held-out images.
    """
    return _classifier("softmax_digits", "softmax regression", softmax_digits.__doc__.split("\n")[0],
                       _digits(300, 0.2), lambda: nn.Linear(64, 10), 300, 10, metric="val loss")


@builtin
def mlp_digits() -> Workload:
    """MLP 64-64-64-10 (ReLU) on digits: 400 train, 10% flipped labels, scored on clean held-out images.

    (Cross-entropy rather than error rate: on 1397 validation images the error rate moves in coarse, noisy
    steps, which makes a "median best" target a lottery.)
    """
    return _classifier("mlp_digits", "MLP", mlp_digits.__doc__.split("\n")[0], _digits(400, 0.1),
                       lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                             nn.Linear(64, 10)), 400, 20, metric="val loss")


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


@builtin
def cnn_digits() -> Workload:
    """Small CNN (2 conv layers + linear) on 8x8 digits: 400 train, 10% flipped labels. Metric: val cross-entropy."""
    return _classifier("cnn_digits", "CNN", cnn_digits.__doc__.split("\n")[0], _digits(400, 0.1), _SmallCNN, 400, 20,
                       metric="val loss")


@builtin
def autoencoder_digits() -> Workload:
    """Autoencoder 64-32-8-32-64 (tanh) on digits (DeepOBS-style reconstruction). Metric: validation MSE."""
    xtr, _, xva, _ = _digits(1000, 0.0)

    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 32), nn.Tanh(),
                             nn.Linear(32, 64))

    return Workload(name="autoencoder_digits", kind="autoencoder",
                    description=autoencoder_digits.__doc__.split("\n")[0],
                    build=build, batch=_index_batch(len(xtr), 32),
                    loss=lambda m, idx: F.mse_loss(m(xtr[idx]), xtr[idx]),
                    evaluate=lambda m: float(F.mse_loss(m(xva), xva)), metric="val MSE", mode="min",
                    **_frozen("autoencoder_digits", 600, 20))


# --------------------------------------------------------------------------------------------- matrix completion
@lru_cache(maxsize=1)
def _completion_data(m=60, n=50, rank=3, noise=0.1):
    rng = np.random.default_rng(DATA_SEED)
    truth = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) / math.sqrt(rank)
    idx = rng.permutation(m * n)
    tr, va = idx[: int(0.3 * m * n)], idx[int(0.3 * m * n): int(0.4 * m * n)]
    obs = truth.reshape(-1) + noise * rng.standard_normal(m * n)
    as_t = lambda a: torch.tensor(a)  # noqa: E731
    return (as_t(tr // n), as_t(tr % n), torch.tensor(obs[tr], dtype=torch.float32),
            as_t(va // n), as_t(va % n), torch.tensor(truth.reshape(-1)[va], dtype=torch.float32))


class _Factors(nn.Module):
    def __init__(self, m, n, r, g):
        super().__init__()
        self.u = nn.Parameter(0.5 * torch.randn(m, r, generator=g))
        self.v = nn.Parameter(0.5 * torch.randn(n, r, generator=g))

    def forward(self, i, j):
        return (self.u[i] * self.v[j]).sum(1)


@builtin
def matrix_completion() -> Workload:
    """Low-rank matrix completion (Candes & Recht 2009): a rank-3 60x50 matrix, 30% of entries seen with noise 0.1.

    Model: rank-6 factorisation U V^T from minibatches of 64 entries. Metric: RMSE on held-out entries of the
    noiseless matrix (optimum 0 in the limit of infinite data).
    """
    ri, ci, y, vi, vj, vy = _completion_data()

    def build(seed):
        return _Factors(60, 50, 6, torch.Generator().manual_seed(seed))

    return Workload(name="matrix_completion", kind="matrix completion",
                    description=matrix_completion.__doc__.split("\n")[0],
                    build=build, batch=_index_batch(len(y), 64),
                    loss=lambda m, b: F.mse_loss(m(ri[b], ci[b]), y[b]),
                    evaluate=lambda m: float(F.mse_loss(m(vi, vj), vy).sqrt()), metric="val RMSE", mode="min",
                    optimum=0.0, **_frozen("matrix_completion", 800, 20))


# --------------------------------------------------------------------------------------------- character LMs
VOCAB, CONTEXT = 12, 24


@lru_cache(maxsize=1)
def markov_source():
    """The seeded order-2 Markov source of the char-LM workloads: (transitions [V, V, V], entropy rate in nats).

    P(c_t | c_{t-2}, c_{t-1}) ~ Dirichlet(0.15) per context; the entropy rate sum_s pi(s) H(P(. | s)) is the
    best validation cross-entropy any model can reach.
    """
    rng = np.random.default_rng(DATA_SEED)
    P = rng.dirichlet(np.full(VOCAB, 0.15), size=(VOCAB, VOCAB))
    pi = np.full((VOCAB, VOCAB), 1.0 / VOCAB**2)  # stationary distribution over pairs, by power iteration
    for _ in range(500):
        pi = np.einsum("ab,abc->bc", pi, P)
    h = -(P * np.log(np.clip(P, 1e-300, None))).sum(-1)
    return P, float((pi * h).sum())


@lru_cache(maxsize=1)
def _markov_text(n_train=30000, n_val=4000):
    P, _ = markov_source()
    rng = np.random.default_rng(DATA_SEED + 1)
    n = n_train + n_val
    out = np.empty(n, dtype=np.int64)
    out[:2] = rng.integers(0, VOCAB, 2)
    cdf = P.cumsum(-1)
    u = rng.random(n)
    for t in range(2, n):
        out[t] = min(int(np.searchsorted(cdf[out[t - 2], out[t - 1]], u[t])), VOCAB - 1)
    text = torch.tensor(out)
    val = text[n_train:]
    nwin = (len(val) - 1) // CONTEXT
    vx = val[: nwin * CONTEXT].view(nwin, CONTEXT)
    vy = val[1: nwin * CONTEXT + 1].view(nwin, CONTEXT)
    return text[:n_train], vx, vy


class _TinyTransformer(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.02 * torch.randn(CONTEXT, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = self.block(h, src_mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


class _TinyGRU(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.rnn = nn.GRU(16, d, batch_first=True)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def _char_lm(name, make, desc, search_budget):
    text, vx, vy = _markov_text()
    _, entropy = markov_source()

    def build(seed):
        torch.manual_seed(seed)
        return make()

    def batch(gen):
        start = torch.randint(0, len(text) - CONTEXT - 1, (16, 1), generator=gen)
        idx = start + torch.arange(CONTEXT + 1)
        return text[idx]

    def loss(model, seq):
        return F.cross_entropy(model(seq[:, :-1]).reshape(-1, VOCAB), seq[:, 1:].reshape(-1))

    def evaluate(model):
        return float(F.cross_entropy(model(vx).reshape(-1, VOCAB), vy.reshape(-1)))

    return Workload(name=name, kind="character LM", description=desc, build=build, batch=batch, loss=loss,
                    evaluate=evaluate, metric="val nats/char", mode="min", optimum=entropy,
                    **_frozen(name, search_budget, 25))


@builtin
def char_lm_transformer() -> Workload:
    """1-layer causal Transformer (Vaswani et al. 2017), d=32, on text from a seeded order-2 Markov source.

    Metric: validation cross-entropy in nats/char; its optimum is the source's entropy rate.
    """
    return _char_lm("char_lm_transformer", _TinyTransformer, char_lm_transformer.__doc__.split("\n")[0], 600)


@builtin
def char_lm_gru() -> Workload:
    """GRU language model (Cho et al. 2014), hidden 32, on the same Markov text. Metric: val nats/char."""
    return _char_lm("char_lm_gru", _TinyGRU, char_lm_gru.__doc__.split("\n")[0], 600)
