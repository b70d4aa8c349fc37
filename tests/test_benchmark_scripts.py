"""The benchmark scripts run end to end on a tiny problem (their numbers are not checked here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from .fused_calls import recording_fused_calls

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_speed_prints_a_row_per_method(monkeypatch, capsys):
    step_speed = _load("step_speed")
    # The real measurement allocates three 2**26-float buffers; the table's columns do not depend on it.
    monkeypatch.setattr(step_speed, "measure_bandwidth", lambda numel: (5e10, {"lerp_": 5e10}))
    step_speed.main(["--numel", "4096", "--tensors", "4", "--only", "adamw,tam,prodigy", "--rounds", "2"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in
            (["adamw"], ["tam"], ["prodigy"])}
    assert set(rows) == {"adamw", "tam", "prodigy"}
    for name, cells in rows.items():
        values = [float(c) for c in cells]
        # floor ms (the fourth cell) of a 4096-element step can print as 0.00; every ratio and time is positive
        assert len(values) == 17 and all(v > 0 for v in values[:2] + values[4:]) and values[3] >= 0, (name, cells)
    # The words each step must move: AdamW reads p, g, m, v and writes p, m, v; Prodigy reads p, g, s, p0, m, v,
    # writes p, s, m, v (p0 is read only) and reads p, m, v again after the global reduction; TAM reads p, g, m,
    # and g and m again after the tensor's cosine, and writes p and m.
    assert [float(rows[k][6]) for k in ("adamw", "prodigy", "tam")] == [7, 13, 7]
    assert [float(rows[k][7]) for k in ("adamw", "prodigy", "tam")] == [4, 9, 5]
    same = [line for line in out.splitlines() if line.startswith("same buffers as torch fused AdamW")]
    assert len(same) == 1 and float(same[0].split()[-1]) > 0


def test_floor_stream_reads_no_gradient_twice_in_a_row(monkeypatch):
    """The floor's stream must move every word it counts from memory: a gradient read for one state and again
    right away for the same tensor's next state would come from the cache."""
    step_speed = _load("step_speed")
    params = step_speed.make_params(4 * 64, 4)
    opt = torch.optim.AdamW(params, lr=1e-6)
    opt.step()
    run, moved = step_speed.own_stream(opt, params)
    seen = []
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda targets, sources, w: seen.append((targets, sources)))
    run()
    [(targets, sources)] = seen
    every = [p for p in params] + [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    assert sorted(map(id, targets)) == sorted(map(id, every)) and moved == 3 * sum(t.numel() for t in every)
    assert all(s is p.grad for t, s in zip(targets, sources) for p in params if t is p or any(
        t is v for v in opt.state[p].values()))
    assert all(a is not b for a, b in zip(sources, sources[1:]))


# (reads, writes) a step must move per parameter, counted from each method's equations: every method reads p and
# g and writes p; a state is read if its old value enters the step and written if the step changes it; a word the
# update must read again after a reduction over its tensor counts twice.
HAND_COUNTED_WORDS = {
    "sgd": (3, 2),  # buf <- mu buf + g; p <- p - lr buf
    "lion": (3, 2),  # p <- p - lr sign(lerp(m, g)); m <- lerp(m, g)
    "adamw": (4, 3),  # m, v read and written
    "diffgrad": (5, 4),  # m, v, and g_prev (read for |g_prev - g|, overwritten with g)
    "adan": (6, 5),  # m, diff, n, g_prev
    "novograd": (4, 2),  # m; g again after ||g||^2 of its tensor
    "gravity": (4, 2),  # V; g again after max|g| of its tensor
    # buf; p, g and buf again after the per-row cosine sums: buf' = mu buf + g is projected in place, so it is
    # either recomputed from g and buf or stored and read back (a write more)
    "sgdp": (6, 2),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTED_WORDS))
def test_algorithm_words_match_the_equations(name):
    step_speed = _load("step_speed")
    info = {i.name: i for i in step_speed.methods()}[name]
    assert step_speed.algorithm_words(info, dict(info.example_kwargs)) == HAND_COUNTED_WORDS[name]


@pytest.mark.parametrize("argv", [["--blocks", "1", "--dim", "32", "--only", "muon", "--steps", "2"],
                                  ["--train", "--blocks", "1", "--dim", "32", "--batch", "2", "--context", "8",
                                   "--only", "muon", "--steps", "2"]])
def test_matrix_speed_runs(argv, capsys):
    matrix_speed = _load("matrix_speed")
    matrix_speed.main(argv)
    assert "muon" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["sync", "background"])
def test_first_step_child_reaches_the_fused_kernel(mode):
    first_step = _load("first_step")
    with recording_fused_calls() as calls:
        r = first_step.child("adamw", 4096, 4, mode, limit_s=120.0)
    assert r["steps_until_fused"] is not None and r["first_s"] > 0 and r["max_s"] >= r["first_s"]
    # A compiled first step runs fused; either way the child stops 5 steps after the first fused one, and each of
    # those 6 steps (one fused-path call each: 4 float32 tensors) had the kernel update all 4 tensors.
    assert mode == "background" or r["steps_until_fused"] == 1
    assert len(calls) == r["steps_until_fused"] + 5
    assert all(len(c.done) == 4 for c in calls.assert_all_fused(len(calls) - 6))


def test_step_speed_channels_last_params_are_conv_weights_with_gradients_in_their_order(monkeypatch, capsys):
    """--channels-last: 3x3 conv weights in channels_last, gradients in the same order (autograd's), numel rounded
    to whole output channels; the table runs on them."""
    step_speed = _load("step_speed")
    params = step_speed.make_params(4 * 2 * 64 * 9 + 5, 4, channels_last=True)
    assert [tuple(p.shape) for p in params] == [(2, 64, 3, 3)] * 4
    assert all(not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               and p.grad.stride() == p.stride() for p in params)
    monkeypatch.setattr(step_speed, "measure_bandwidth", lambda numel: (5e10, {"lerp_": 5e10}))
    step_speed.main(["--numel", str(4 * 2 * 64 * 9), "--tensors", "4", "--only", "adamw", "--rounds", "2",
                     "--channels-last"])
    out = capsys.readouterr().out
    assert "(channels_last)" in out and any(line.startswith("adamw ") for line in out.splitlines())
