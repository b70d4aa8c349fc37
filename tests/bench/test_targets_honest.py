"""Honesty of the frozen targets: each is reached by its tuned baseline within the budget, and not by a
deliberately bad setting (lr 1e-7), so targets separate optimizers. Plus the targets-file rules."""

import pytest

from steepest.bench.targets import steps_to_reach, write_targets
from steepest.bench.trial import run_trial
from steepest.bench.workloads.base import builtin_names, frozen_targets, get_workload

FROZEN = frozen_targets()["workloads"]


@pytest.mark.slow
@pytest.mark.parametrize("name", builtin_names())
def test_target_reachable_by_tuned_baseline_and_not_by_a_bad_setting(name):
    if name not in FROZEN:
        pytest.skip(f"{name} has no frozen target yet (run `steepest bench targets --write`)")
    w = get_workload(name)
    ref = FROZEN[name]["reference"]
    seed = FROZEN[name]["confirmed_seeds_reaching_at_budget"][0]
    good = run_trial(name, ref["optimizer"], ref["hparams"], seed=seed)
    assert good.reached and good.steps_to_target <= w.budget, (good.best_metric, w.target)
    bad = dict(ref["hparams"], lr=1e-7)
    assert not run_trial(name, ref["optimizer"], bad, seed=seed).reached


def test_frozen_targets_file_is_complete():
    assert frozen_targets()["version"] >= 1
    for name in builtin_names():
        entry = FROZEN[name]
        w = get_workload(name)
        assert w.target == entry["target"] and w.budget == entry["budget"] and w.version == frozen_targets()["version"]


def test_targets_change_only_by_a_new_version(tmp_path):
    doc = {"version": 7, "workloads": {}}
    write_targets(doc, tmp_path)
    with pytest.raises(FileExistsError, match="new version"):
        write_targets(doc, tmp_path)


def test_steps_to_reach():
    log = [[10, 0.1, 1.0, 0.9], [20, 0.2, 0.8, 0.5], [30, 0.3, 0.7, 0.4]]
    assert steps_to_reach(log, 0.5, "min") == 20
    assert steps_to_reach(log, 0.1, "min") is None
    assert steps_to_reach(log, 0.9, "max") == 10
