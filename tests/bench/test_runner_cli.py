"""The runner (resume, pool), user workloads by import path, and the ``steepest bench`` command line."""

import argparse
import math

import pytest

from steepest.bench.cli import add_bench_parser
from steepest.bench.runner import make_plan, run_plan
from steepest.bench.store import Store
from steepest.bench.suite import aggregate, run_suite, suite_from_store
from steepest.bench.workloads.base import get_workload

USER = "tests.bench.userwl:make_workload"


def _content(recs):
    return {k: (r.reached, r.steps_to_target, r.best_metric, r.final_metric, r.diverged,
                [[row[0], row[2], row[3]] for row in r.log]) for k, r in recs.items()}


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    args = ([USER, "quadratic_deep"], ["adamw", "sgd"], 2, 2, 1)
    plan = make_plan(*args)
    whole = Store(tmp_path / "whole.db")
    full = run_plan(plan, whole, progress=False)
    parts = Store(tmp_path / "parts.db")
    first = run_plan(plan, parts, progress=False, max_new=5)  # "killed" after 5 of 16 trials
    assert len(first) == 5
    resumed = run_plan(plan, parts, progress=False)
    assert _content(resumed) == _content(full)
    again = run_plan(plan, parts, progress=False)  # nothing left to run: same records
    assert _content(again) == _content(full)
    a = aggregate({"workloads": args[0]}, plan, full)
    b = aggregate({"workloads": args[0]}, plan, resumed)
    assert a.scores == b.scores and a.times == b.times


def test_process_pool_gives_the_same_records(tmp_path):
    plan = make_plan([USER], ["adamw"], 2, 1, 1)
    serial = run_plan(plan, Store(tmp_path / "a.db"), jobs=1, progress=False)
    pooled = run_plan(plan, Store(tmp_path / "b.db"), jobs=2, progress=False)
    assert _content(serial) == _content(pooled)


def test_user_workload_and_bad_import_paths():
    w = get_workload(USER)
    assert w.name == "user_ls" and w.target == 0.5
    with pytest.raises(ImportError, match="importing module 'no_such_pkg.mod' failed"):
        get_workload("no_such_pkg.mod:make")
    with pytest.raises(RuntimeError, match="boom"):
        get_workload("tests.bench.userwl:broken_factory")
    with pytest.raises(KeyError, match="did you mean char_lm_gru"):
        get_workload("char_lm_gr")


def _parser():
    parser = argparse.ArgumentParser(prog="steepest")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_runs_resumes_and_rerenders(tmp_path, capsys):
    store, out = str(tmp_path / "s.db"), tmp_path / "rep"
    argv = ["bench", "--workloads", f"{USER},quadratic_deep", "--optimizers", "adamw,sgd,tests.bench.userwl:MySGD",
            "--trials", "3", "--studies", "2", "--jobs", "1", "--store", store, "--out", str(out), "--quiet"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "report:" in text and "score" in text
    for f in ("report.html", "report.md", "results.csv", "scores.csv", "profiles.png", "curves_user_ls.png"):
        assert (out / f).exists(), f
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("workload,optimizer,study,trial,seed,hyperparameters,reached,steps_to_target")
    assert len(rows) == 1 + 2 * 3 * 3 * 2
    assert "<img" in (out / "report.html").read_text()
    args = _parser().parse_args(["bench", "report", "--store", store, "--out", str(tmp_path / "rep2"), "--no-plots"])
    assert args.func(args) == 0
    assert (tmp_path / "rep2" / "scores.csv").read_text() == (out / "scores.csv").read_text()
    res = suite_from_store(Store(store))
    assert len(res.records) == 36 and all(math.isfinite(s) for s in res.scores.values())


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    p = _parser()
    for argv, msg in ((["bench", "--optimizers", "adamx"], "did you mean adam"),
                      (["bench", "--workloads", "mlp_digit"], "did you mean mlp_digits"),
                      (["bench", "--workloads", "nope.mod:f"], "importing module 'nope.mod' failed")):
        args = p.parse_args([*argv, "--store", str(tmp_path / "x.db")])
        assert args.func(args) == 2
        assert msg in capsys.readouterr().err
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite")
    args = p.parse_args(["bench", "--workloads", USER, "--optimizers", "adamw", "--store", str(bad)])
    assert args.func(args) == 2
    assert "not an SQLite database" in capsys.readouterr().err and bad.read_text() == "not sqlite"


def test_suite_goes_on_when_an_optimizer_diverges(tmp_path):
    """Every trial of an optimizer that turns the params into NaN is recorded as diverged (numerically, not raised),
    the other optimizer's trials run to the end, and its cell's numbers come from them alone."""
    res = run_suite(["tests.bench.userwl:make_workload"], ["tests.bench.userwl:NaNSGD", "sgd"], 3, 1, 1,
                    Store(tmp_path / "d.db"), progress=False)
    bad = [c for k, c in res.cells.items() if k[1].endswith("NaNSGD")]
    assert len(bad) == 1 and bad[0].n_trials == 3 and bad[0].divergence_fraction == 1.0
    nan_records = [r for r in res.records.values() if r.optimizer.endswith("NaNSGD")]
    assert len(nan_records) == 3 and all(r.diverged and r.error.startswith("non-finite") for r in nan_records)
    good = res.cells[("user_ls", "sgd")]
    assert good.n_trials == 3 and good.divergence_fraction < 1.0
    sgd_records = [r for r in res.records.values() if r.optimizer == "sgd"]
    assert all(not r.error for r in sgd_records) and any(not r.diverged for r in sgd_records)


def test_trials_that_raise_are_listed_apart_from_numerical_divergence_and_rerun_on_resume(tmp_path, monkeypatch):
    from steepest.bench.report import write_report
    from tests.bench.userwl import CrashingSGD

    store = Store(tmp_path / "f.db")
    res = run_suite(["tests.bench.userwl:make_workload"], ["tests.bench.userwl:CrashingSGD", "sgd"], 2, 1, 1,
                    store, progress=False)
    crashed = [r for r in res.records.values() if r.optimizer.endswith("CrashingSGD")]
    assert len(crashed) == 2 and all(r.diverged and r.error.startswith("raised NotImplementedError") for r in crashed)
    assert all(not r.error for r in res.records.values() if r.optimizer == "sgd")
    md = (write_report(res, tmp_path / "rep", plots=False).parent / "report.md").read_text()
    assert "2 trial(s) in 1 cell(s) raised an exception" in md
    table = md.split("## Failed trials")[1]
    assert "CrashingSGD | 2 | NotImplementedError: this optimizer cannot step a third time" in table
    # Once the optimizer supports the operation, resuming runs exactly the trials that raised, in place.
    sgd_records = {k: r for k, r in res.records.items() if r.optimizer == "sgd"}
    monkeypatch.setattr(CrashingSGD, "max_steps", 10**6)
    again = run_suite(["tests.bench.userwl:make_workload"], ["tests.bench.userwl:CrashingSGD", "sgd"], 2, 1, 1,
                      store, progress=False)
    assert len(again.records) == 4 and not any(r.error for r in again.records.values())
    assert all(again.records[k].wall_s == r.wall_s for k, r in sgd_records.items())
    assert sorted(r.key for r in again.records.values() if r.optimizer.endswith("CrashingSGD")) == sorted(
        r.key for r in crashed)


def test_ray_engine_optional(tmp_path):
    """Ray is an optional extra: without it, a clear message; with it, the same records as the local pool."""
    plan = make_plan([USER], ["adamw"], 2, 1, 1)
    try:
        import ray  # noqa: F401
    except ImportError:
        from steepest.bench.ray_engine import run_plan_ray
        with pytest.raises(ImportError, match="pip install"):
            run_plan_ray(plan, Store(tmp_path / "r.db"), progress=False)
        pytest.skip("ray is not installed (optional extra); checked the error message only")
    from steepest.bench.ray_engine import run_plan_ray
    local = run_plan(plan, Store(tmp_path / "l.db"), progress=False)
    remote = run_plan_ray(plan, Store(tmp_path / "r.db"), progress=False)
    assert _content(local) == _content(remote)


def test_report_without_a_suite_is_a_clear_error(tmp_path, capsys):
    args = _parser().parse_args(["bench", "report", "--store", str(tmp_path / "empty.db")])
    assert args.func(args) == 2
    assert "has no suite yet" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_same_results(tmp_path):
    """A real kill -9 of `steepest bench` mid-run loses only trials in flight; resuming equals an uninterrupted run."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time
    store = tmp_path / "killed.db"
    cmd = [sys.executable, "-m", "steepest.bench.cli", "--workloads", "quadratic_deep", "--optimizers", "adamw",
           "--trials", "8", "--studies", "1", "--jobs", "1", "--no-plots", "--quiet", "--store", str(store),
           "--out", str(tmp_path / "r")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd())
    n = 0
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if store.exists():
            try:
                with sqlite3.connect(store) as con:
                    n = con.execute("select count(*) from steepest_trials").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
            if n >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    plan = make_plan(["quadratic_deep"], ["adamw"], 8, 1, 1)
    before = Store(store).keys()
    assert proc.returncode == -signal.SIGKILL and 2 <= len(before) < 8, (proc.returncode, len(before))
    resumed = run_plan(plan, Store(store), progress=False)
    whole = run_plan(plan, Store(tmp_path / "whole.db"), progress=False)
    assert _content(resumed) == _content(whole)
