"""Search spaces (Halton, conventions, bad spaces), trials (schedule, determinism, divergence) and the store."""

import math
import sqlite3

import pytest
import torch

from steepest.bench.space import OptimizerSpec, halton, radical_inverse
from steepest.bench.store import Store, StoreError
from steepest.bench.trial import run_trial, warmup_cosine


def test_halton_points_and_shift():
    assert [radical_inverse(i, 2) for i in (1, 2, 3)] == [0.5, 0.25, 0.75]
    pts = halton(4, 2)
    assert pts[:, 1].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 9, 4 / 9])
    shifted = halton(4, 2, seed=3)
    assert not (shifted == pts).all() and ((shifted >= 0) & (shifted < 1)).all()


def test_sample_bounds_and_conventions():
    spec = OptimizerSpec("adamw")
    pts = spec.sample(16, seed=1)
    for p in pts:
        for k, (_, lo, hi) in spec.space.items():
            assert lo <= p[k] <= hi
    kw = spec.kwargs({"lr": 1e-3, "one_minus_beta1": 0.1, "weight_decay": 0.01})
    assert kw["betas"] == (0.9, 0.999)
    sgd = OptimizerSpec("sgd")
    kw = sgd.kwargs({"lr": 0.1, "one_minus_momentum": 0.05})
    assert kw["momentum"] == pytest.approx(0.95) and kw["nesterov"] is True


def test_user_optimizer_default_space_and_bad_space():
    spec = OptimizerSpec("tests.bench.userwl:MySGD")
    assert spec.space == {"lr": ("log", 1e-4, 1e-1)}
    with pytest.raises(ValueError, match="rejects the corner"):
        OptimizerSpec("tests.bench.userwl:BadSpaceSGD")
    with pytest.raises(KeyError, match="did you mean"):
        OptimizerSpec("adamv")
    with pytest.raises(ImportError, match="no attribute"):
        OptimizerSpec("tests.bench.userwl:Nope")


@pytest.mark.parametrize("space,msg", [({"lr": ("log", 0.0, 1.0)}, "low must be > 0"),
                                       ({"lr": ("uniform", 1.0, 0.1)}, "low < high"),
                                       ({"lr": ("normal", 0.1, 1.0)}, "distribution"),
                                       ({"one_minus_momentum": ("log", 0.1, 2.0)}, r"\[0, 1\]"),
                                       ({"lrr": ("log", 0.1, 1.0)}, "did you mean lr")])
def test_bad_search_spaces(monkeypatch, space, msg):
    from tests.bench import userwl
    monkeypatch.setattr(userwl.MySGD, "search_space", space, raising=False)
    with pytest.raises(ValueError, match=msg):
        OptimizerSpec("tests.bench.userwl:MySGD")


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert lrs[52] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert lrs[-1] < 0.001


def _content(r):
    d = r.to_dict()
    for k in ("ms_per_step", "wall_s", "seconds_to_target"):
        d.pop(k)
    d["log"] = [[row[0], row[2], row[3]] for row in d["log"]]
    return d


def test_same_config_twice_gives_identical_records():
    hp = {"lr": 3e-3, "one_minus_beta1": 0.1, "weight_decay": 0.01}
    a = run_trial("mlp_digits", "adamw", hp, seed=5, budget=60)
    b = run_trial("mlp_digits", "adamw", hp, seed=5, budget=60)
    assert _content(a) == _content(b)
    c = run_trial("mlp_digits", "adamw", hp, seed=6, budget=60)
    assert c.key != a.key and _content(c) != _content(a)


def test_divergence_is_recorded_not_raised():
    r = run_trial("quadratic_deep", "sgd", {"lr": 5.0, "one_minus_momentum": 0.001}, seed=0, budget=100)
    assert r.diverged and not r.reached and "non-finite" in r.error and math.isnan(r.final_metric)


def test_store_roundtrip_and_bad_files(tmp_path):
    r = run_trial("tests.bench.userwl:make_workload", "adamw", {"lr": 0.1}, seed=0)
    st = Store(tmp_path / "s.db")
    st.put(r)
    st.put(r)  # content-addressed: a second put is a no-op
    got = st.get()
    assert list(got) == [r.key] and _content(got[r.key]) == _content(r)
    st.close()
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not a database at all")
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store(bad)
    assert bad.read_bytes() == b"this is not a database at all"
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("create table people (name text)")
    con.execute("insert into people values ('ada')")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="another program"):
        Store(foreign)
    con = sqlite3.connect(foreign)
    assert con.execute("select name from sqlite_master").fetchall() == [("people",)]
    con.close()
