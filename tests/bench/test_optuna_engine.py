"""The Optuna engine: workers sharing one Optuna RDB storage pull the suite's Halton trials from one study."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steepest.bench.cli import add_bench_parser
from steepest.bench.runner import make_plan, run_plan
from steepest.bench.store import Store

from .test_runner_cli import _content

ROOT = Path(__file__).resolve().parents[2]
SLOW = "tests.bench.userwl:make_slow_a,tests.bench.userwl:make_slow_b"
FAST = "tests.bench.userwl:make_workload"


def _parser():
    parser = argparse.ArgumentParser(prog="steepest")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_missing_optuna_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    from steepest.bench.optuna_engine import run_plan_optuna
    cfg = {"workloads": [FAST], "optimizers": ["adamw"], "trials": 1, "studies": 1, "seeds": 1}
    with pytest.raises(ImportError, match="pip install 'optuna"):
        run_plan_optuna(make_plan(**cfg), Store(tmp_path / "s.db"), cfg, progress=False)
    args = _parser().parse_args(["bench", "--engine", "optuna", "--workloads", FAST, "--optimizers", "adamw",
                                 "--trials", "1", "--store", str(tmp_path / "s.db"), "--quiet"])
    assert args.func(args) == 2
    assert "needs the optional dependency Optuna" in capsys.readouterr().err


def _study(storage):
    import optuna
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1 and names[0].startswith("steepest-bench-"), names
    return optuna.load_study(study_name=names[0], storage=storage)


def test_two_processes_share_one_sqlite_study(tmp_path):
    """The same `steepest bench --engine optuna` started twice: one study, every trial run exactly once, by both
    processes together, and the stored records equal the local engine's for the same plan."""
    pytest.importorskip("optuna")
    from optuna.trial import TrialState
    store, storage, runlog = tmp_path / "results.sqlite", tmp_path / "optuna.sqlite", tmp_path / "runs.txt"
    cmd = [sys.executable, "-m", "steepest.bench.cli", "--engine", "optuna", "--storage", str(storage),
           "--workloads", SLOW, "--optimizers", "adamw", "--trials", "4", "--studies", "1", "--jobs", "1",
           "--store", str(store), "--no-plots", "--quiet"]
    env = {**os.environ, "STEEPEST_TEST_RUNLOG": str(runlog)}
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"rep{i}")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    plan = make_plan(SLOW.split(","), ["adamw"], 4, 1, 1)
    keys = {p.key for p in plan}
    assert len(keys) == 8
    runs = runlog.read_text().split("\n")[:-1]
    assert len(runs) == 8 and len({r.rsplit(" ", 1)[0] for r in runs}) == 8, runs  # each trial trained once
    assert len({r.rsplit(" ", 1)[1] for r in runs}) == 2, runs  # ... by both processes together

    study = _study(f"sqlite:///{storage}")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["steepest_key"] for t in done) == sorted(keys)
    assert not [t for t in study.trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    assert all(t.user_attrs.get("steepest_key") is None for t in study.trials if t.state != TrialState.COMPLETE)
    points = {(p.workload, p.study, p.trial): p.hparams for p in plan}
    for t in done:  # the Optuna trials are our Halton points, not sampled ones
        a = t.user_attrs
        assert t.params == {f"adamw:{k}": v for k, v in points[(a["workload"], a["study"], a["trial"])].items()}

    stored = Store(store).get(keys)
    local = run_plan(plan, Store(tmp_path / "local.sqlite"), progress=False)
    assert set(stored) == set(local) == keys
    assert _content(stored) == _content(local)
    for i in range(2):  # both drivers waited for the whole suite and reported it
        assert len((tmp_path / f"rep{i}" / "results.csv").read_text().splitlines()) == 1 + 8
    args = _parser().parse_args(["bench", "report", "--store", str(store), "--out", str(tmp_path / "r"),
                                 "--no-plots"])
    assert args.func(args) == 0


def test_worker_command_and_requeue_after_an_interrupted_trial(tmp_path, capsys):
    """`steepest bench worker` runs a prepared study (storage = the results store's database); a trial whose
    worker was interrupted (FAIL) is re-queued by the next `--engine optuna` run, and nothing else re-runs."""
    pytest.importorskip("optuna")
    from optuna.trial import TrialState

    from steepest.bench.optuna_engine import prepare_study, run_plan_optuna
    cfg = {"workloads": [FAST], "optimizers": ["adamw", "sgd"], "trials": 2, "studies": 1, "seeds": 1}
    plan = make_plan(**cfg)
    db = tmp_path / "both.sqlite"
    store = Store(db)
    prepare_study(plan, store, cfg)  # Optuna's tables beside ours in one database
    study = _study(store.url)
    interrupted = study.ask()  # a worker takes a trial and dies with it (Ctrl-C marks it failed)
    study.tell(interrupted, state=TrialState.FAIL)
    args = _parser().parse_args(["bench", "worker", "--storage", str(db), "--jobs", "1"])
    assert args.func(args) == 0
    assert "ran 3 trials" in capsys.readouterr().out
    assert len(store.keys()) == 3
    records = run_plan_optuna(plan, store, cfg, progress=False)  # re-queues the failed one and runs it
    assert set(records) == {p.key for p in plan}
    assert _content(records) == _content(run_plan(plan, Store(tmp_path / "local.sqlite"), progress=False))
    states = [t.state for t in _study(store.url).trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1
    assert run_plan_optuna(plan, store, cfg, progress=False).keys() == records.keys()  # nothing left: no new trial
    assert len(_study(store.url).trials) == 5
    args = _parser().parse_args(["bench", "worker", "--storage", str(db)])
    assert args.func(args) == 0 and "no steepest-bench study with trials waiting" in capsys.readouterr().out


def test_trial_of_a_dead_worker_is_requeued_and_run(tmp_path):
    """A worker that dies mid-trial stops its heartbeat: the next worker fails the stale trial, Optuna re-queues a
    copy (same key and Halton point), and it runs; the results equal the local engine's."""
    pytest.importorskip("optuna")
    import time

    from optuna.trial import TrialState

    from steepest.bench.optuna_engine import open_storage, prepare_study, work
    cfg = {"workloads": [FAST], "optimizers": ["adamw"], "trials": 2, "studies": 1, "seeds": 1}
    plan = make_plan(**cfg)
    store = Store(tmp_path / "s.sqlite")
    name = prepare_study(plan, store, cfg)
    study = _study(store.url)
    dead = study.ask()  # taken by a worker that wrote one heartbeat and died
    open_storage(store.url, heartbeat_interval=1, grace_period=1).record_heartbeat(dead._trial_id)
    time.sleep(2.1)
    assert work(store.url, name, heartbeat_interval=1, grace_period=1) == 2
    trials = _study(store.url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].user_attrs["steepest_key"] == trials[0].user_attrs["steepest_key"]
    point = {p.key: p.hparams for p in plan}[trials[2].user_attrs["steepest_key"]]
    assert trials[2].params == {f"adamw:{k}": v for k, v in point.items()}
    local = run_plan(plan, Store(tmp_path / "local.sqlite"), progress=False)
    assert _content(store.get()) == _content(local)
