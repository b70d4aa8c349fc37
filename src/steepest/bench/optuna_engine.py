"""Optional scale-out of benchmark trials through a shared Optuna study (Akiba et al. 2019, arXiv 1907.10902).

Several worker processes, on one machine or many, share one Optuna RDB storage (an SQLAlchemy URL:
``sqlite:///bench.sqlite`` on one machine, ``postgresql://host/db`` across machines). The suite's plan is put
into one Optuna study as *enqueued* trials (``Study.enqueue_trial``), one per planned trial, with the trial's
Halton point as fixed parameters and its content hash as a user attribute. Each worker asks the study for the
next waiting trial (Optuna hands every waiting trial to exactly one worker: its state changes WAITING -> RUNNING
in one database update), runs it exactly as the local engine does, writes the record to our results store and
then tells Optuna the trial is complete. No sampler is ever consulted for a benchmark trial (all parameters are
fixed), so the trials are the AlgoPerf Halton points of :mod:`steepest.bench.space` and the records equal the
local engine's. Optuna's heartbeat marks a trial whose worker died as stale after ``GRACE_S`` seconds and puts
a copy back in the queue (``RetryHeartbeatStaleTrialCallback``), so losing a machine loses only its trials in
flight.

Optuna is an optional extra (``pip install optuna``); every worker needs the same steepest version (it is part
of each trial's content hash) and the same workloads and optimizers importable.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import math
import multiprocessing as mp
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from tqdm import tqdm

from .runner import PlannedTrial, _init_worker, execute, make_plan
from .space import OptimizerSpec
from .store import Store, _url
from .trial import TrialResult, package_version

STUDY_PREFIX = "steepest-bench-"
HEARTBEAT_S = 20  # a worker writes a heartbeat for its running trial this often
GRACE_S = 120  # a running trial without a heartbeat for this long is stale: failed and re-queued
MAX_RETRY = 3  # times a stale trial is re-queued
KEY = "steepest_key"  # user attribute of an Optuna trial: the content hash of the planned trial it runs


def _optuna():
    try:
        import optuna
    except ImportError as err:
        raise ImportError("--engine optuna needs the optional dependency Optuna: pip install 'optuna>=4' "
                          "(or pip install 'steepest[optuna]'), or use the default local process pool") from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(url: str | Path, heartbeat_interval: int = HEARTBEAT_S, grace_period: int = GRACE_S):
    """An Optuna RDB storage at ``url`` (a file path means SQLite) with heartbeats and retry of stale trials."""
    optuna = _optuna()
    url = _url(url)
    kw: dict = {}
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if retry is not None:
            kw["heartbeat_stale_trial_callback"] = retry(max_retry=MAX_RETRY)
        else:  # pragma: no cover - Optuna < 4.9
            kw["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                  **kw)
            except sa.exc.SQLAlchemyError:
                # Several workers creating the same new storage at once race on Optuna's schema rows; the loser
                # finds the schema made on its next try.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _sampler():
    # Never consulted for benchmark trials (their parameters are all fixed by the queue); a cheap, seeded one
    # rather than the default TPE so that nothing adaptive can ever enter the protocol.
    return _optuna().samplers.RandomSampler(seed=0)


def _unique(plan: list[PlannedTrial]) -> list[PlannedTrial]:
    seen: set[str] = set()
    out = []
    for p in plan:
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out


def study_name_for(plan: list[PlannedTrial]) -> str:
    """The default study name of a plan: a hash of its trial keys, so the same plan started anywhere joins it."""
    digest = hashlib.sha256("\n".join(sorted({p.key for p in plan})).encode()).hexdigest()
    return STUDY_PREFIX + digest[:16]


def _param_name(optimizer: str, name: str) -> str:
    # Prefixed by the optimizer: Optuna requires one distribution kind per parameter name within a study.
    return f"{optimizer}:{name}"


def _enqueue(study, p: PlannedTrial) -> None:
    study.enqueue_trial({_param_name(p.optimizer, k): v for k, v in p.hparams.items()},
                        user_attrs={KEY: p.key, "workload": p.workload, "optimizer": p.optimizer,
                                    "study": p.study, "trial": p.trial, "seed": p.seed})


def _trials(study, *states) -> list:
    return study.get_trials(deepcopy=False, states=tuple(states))


def _state(name: str):
    return getattr(_optuna().trial.TrialState, name)


def prepare_study(plan: list[PlannedTrial], store: Store, config: dict, storage: str | Path | None = None,
                  study_name: str | None = None, wait_s: float = 600.0) -> str:
    """Create the Optuna study of ``plan`` in ``storage`` and enqueue its trials missing from ``store``, or join it.

    Creating a study is atomic (its name is unique), so of several copies of the same command started at once
    exactly one enqueues; the others wait until it has finished. Joining an existing study re-queues planned
    trials that are neither in the store nor waiting or running (e.g. after an interrupted worker). Returns the
    study's name. ``storage`` defaults to the results store's database (Optuna's tables sit beside ours).
    """
    optuna = _optuna()
    st = open_storage(storage or store.url)
    name = study_name or study_name_for(plan)
    todo = _unique(plan)
    try:
        study = optuna.create_study(storage=st, study_name=name, direction="minimize", sampler=_sampler())
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=st, sampler=_sampler())
        created = False
    study.set_user_attr("steepest_store", store.url)
    if created:
        study.set_user_attr("steepest_config", config)
        study.set_user_attr("steepest_version", package_version())
        done = store.keys(settled=True)
        for p in todo:
            if p.key not in done:
                _enqueue(study, p)
        study.set_user_attr("steepest_ready", True)
        return name
    deadline = time.monotonic() + wait_s
    while not study.user_attrs.get("steepest_ready"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Optuna study {name!r} in {st.url!r} was created but its trials were never fully "
                               "enqueued (its creator died?); pass a new --study-name")
        time.sleep(0.5)
    if study.user_attrs.get("steepest_config") != config:
        raise ValueError(f"Optuna study {name!r} holds another suite ({study.user_attrs.get('steepest_config')}); "
                         "pass another --study-name")
    queued = {t.user_attrs.get(KEY) for t in _trials(study, _state("WAITING"), _state("RUNNING"))}
    done = store.keys(settled=True)
    for p in todo:
        if p.key not in done and p.key not in queued:
            _enqueue(study, p)
    return name


def find_studies(storage: str | Path) -> list[str]:
    """Names of the steepest-bench studies in ``storage`` that have trials waiting, newest first."""
    optuna = _optuna()
    st = open_storage(storage)
    out = []
    for name in reversed(optuna.get_all_study_names(st)):
        if name.startswith(STUDY_PREFIX):
            study = optuna.load_study(study_name=name, storage=st, sampler=_sampler())
            if _trials(study, _state("WAITING")):
                out.append(name)
    return out


def work(storage: str | Path, study_name: str, store: str | Path | None = None,
         on_trial: Callable[[TrialResult], None] | None = None, heartbeat_interval: int = HEARTBEAT_S,
         grace_period: int = GRACE_S) -> int:
    """Be one worker of a study: run its waiting trials one at a time until none is left. Returns trials run.

    Every record goes to the results store (``store``, default the one the suite's driver recorded in the study)
    before Optuna is told the trial is complete, so a complete Optuna trial always has its record stored.
    """
    optuna = _optuna()
    st = open_storage(storage, heartbeat_interval, grace_period)
    study = optuna.load_study(study_name=study_name, storage=st, sampler=_sampler())
    attrs = study.user_attrs
    if "steepest_config" not in attrs:
        raise ValueError(f"Optuna study {study_name!r} in {st.url!r} is not a steepest-bench study")
    results = Store(store or attrs["steepest_store"])
    plan = {p.key: p for p in make_plan(**attrs["steepest_config"])}
    foreign = {t.user_attrs.get(KEY) for t in _trials(study, _state("WAITING"))} - set(plan)
    if foreign:
        raise RuntimeError(f"{len(foreign)} queued trials of study {study_name!r} are not in the plan this machine "
                           f"computes (study made with steepest {attrs.get('steepest_version')}, this is "
                           f"{package_version()}); install the same steepest, workloads and optimizers everywhere")
    specs: dict[str, OptimizerSpec] = {}
    tag = f"{socket.gethostname()}:{os.getpid()}"
    ran = 0

    def objective(trial) -> float:
        nonlocal ran
        key = trial.user_attrs.get(KEY)
        if key is None:  # the queue emptied between our look and Optuna's ask: a fresh trial, nothing to run
            trial.set_user_attr("steepest_note", "no queued trial was left for this worker")
            trial.study.stop()
            raise optuna.TrialPruned("no queued trial left")
        p = plan.get(key)
        if p is None:
            trial.study.stop()
            raise RuntimeError(f"trial {key} is not in this machine's plan (steepest version mismatch?)")
        spec = specs.setdefault(p.optimizer, OptimizerSpec(p.optimizer))
        for k in p.hparams:  # record the fixed point in Optuna (returns the enqueued value, no sampling)
            dist, lo, hi = spec.space[k]
            trial.suggest_float(_param_name(p.optimizer, k), lo, hi, log=dist == "log")
        rec = results.get({key}).get(key)
        if rec is None:
            rec = execute(p)
            results.put(rec)
            ran += 1
            trial.set_user_attr("steepest_worker", tag)
        else:  # stored already (by an earlier run, or a worker that died before telling Optuna)
            trial.set_user_attr("steepest_from_store", True)
        trial.set_user_attr("reached", bool(rec.reached))
        trial.set_user_attr("best_metric", None if math.isnan(rec.best_metric) else rec.best_metric)
        if on_trial is not None:
            on_trial(rec)
        return float(rec.steps_to_target) if rec.reached else math.inf

    def stop_when_empty(study, _trial) -> None:
        if not _trials(study, _state("WAITING")):
            study.stop()

    try:
        if _trials(study, _state("WAITING")):
            study.optimize(objective, callbacks=[stop_when_empty], gc_after_trial=False)
    finally:
        results.close()
    return ran


def _pool_work(storage: str, study_name: str, store: str | None) -> int:
    return work(storage, study_name, store)


def run_workers(storage: str | Path, study_name: str, store: str | Path | None = None, jobs: int = 1,
                on_poll: Callable[[], None] | None = None, poll_s: float = 1.0) -> int:
    """Run ``jobs`` workers of a study on this machine (one torch thread each) until its queue is empty."""
    storage, store = _url(storage), None if store is None else _url(store)
    if jobs <= 1:
        return work(storage, study_name, store, on_trial=(lambda _r: on_poll()) if on_poll else None)
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(_pool_work, storage, study_name, store) for _ in range(jobs)]
        try:
            while not all(f.done() for f in futures):
                cf.wait(futures, timeout=poll_s)
                if on_poll is not None:
                    on_poll()
            return sum(f.result() for f in futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def run_plan_optuna(plan: list[PlannedTrial], store: Store, config: dict, storage: str | Path | None = None,
                    study_name: str | None = None, jobs: int = 1, progress: bool = True,
                    poll_s: float = 2.0) -> dict[str, TrialResult]:
    """Run ``plan`` through a shared Optuna study with ``jobs`` local workers; other machines may join it.

    Returns (like :func:`steepest.bench.runner.run_plan`) key -> record for the whole plan, once no planned
    trial is waiting or running anywhere.
    """
    optuna = _optuna()
    storage = _url(storage or store.url)
    name = prepare_study(plan, store, config, storage, study_name)
    keys = {p.key for p in plan}
    start = len(store.keys() & keys)
    bar = tqdm(total=len(keys), initial=start, desc=f"steepest bench (optuna {name})", unit="trial",
               disable=not progress or start == len(keys), dynamic_ncols=True)

    def poll() -> None:
        bar.n = len(store.keys() & keys)
        bar.refresh()

    st = open_storage(storage)
    study = optuna.load_study(study_name=name, storage=st, sampler=_sampler())
    try:
        while True:
            run_workers(storage, name, store.url, jobs=jobs, on_poll=poll)
            poll()
            if _trials(study, _state("WAITING")):
                continue
            running = [t for t in _trials(study, _state("RUNNING")) if t.user_attrs.get(KEY) in keys]
            if not running:
                break
            # Other workers still run trials: wait for them (and re-queue theirs if their heartbeat stops).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            time.sleep(poll_s)
    finally:
        bar.close()
    return store.get(keys)
