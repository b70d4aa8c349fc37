"""The ``steepest bench`` command: run the suite, re-render its report, list workloads, set targets.

The protocol is AlgoPerf's external tuning (Dahl et al. 2023, arXiv 2306.07179) scaled to a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..core.registry import REGISTRY
from .report import SUMMARY_HEAD, summary_rows, text_table, write_report
from .runner import FULL, QUICK, QUICK_OPTIMIZERS, default_jobs
from .space import OptimizerSpec
from .store import Store, StoreError
from .suite import run_suite, suite_from_store
from .workloads.base import builtin_names, get_workload

DEFAULT_STORE = "steepest-bench.sqlite"
DEFAULT_OUT = "steepest-report"


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help=f"results store: a file (SQLite) or an SQLAlchemy URL "
                   f"(default {DEFAULT_STORE})")
    p.add_argument("--out", default=None, help=f"report folder (default ./{DEFAULT_OUT})")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with sub-commands ``report``, ``targets``, ``workloads``) to an argparse subparsers object.

    Returns the ``bench`` parser; its ``func`` default runs the command.
    """
    p = subparsers.add_parser(
        "bench", help="benchmark optimizers on the built-in quick suite (AlgoPerf-style), report with plots",
        description="Tune every optimizer on every workload with quasi-random search (AlgoPerf external tuning), "
                    "measure steps to a frozen target, and write an HTML/Markdown report with results.csv and "
                    "scores.csv. Re-running resumes: finished trials are read from the store; trials that raised "
                    "run again.")
    p.add_argument("--workloads", "--workload", default=None,
                   help="comma-separated built-in names or import paths pkg.mod:make_workload (default: all built-in)")
    p.add_argument("--optimizers", "--optimizer", default=None,
                   help="comma-separated registry names or import paths pkg.mod:OptimizerClass "
                        f"(default: those registered among {', '.join(QUICK_OPTIMIZERS)})")
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help=f"preset sizes: quick {QUICK}, full {FULL}")
    p.add_argument("--trials", type=int, default=None, help="trials per study (Halton points)")
    p.add_argument("--studies", type=int, default=None, help="independent studies (different Halton shifts/seeds)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per trial")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--engine", choices=("local", "ray", "optuna"), default="local",
                   help="local process pool (default), a Ray cluster (optional extra: pip install ray), or a "
                        "shared Optuna study that workers on other machines join (optional extra: pip install optuna)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start/attach locally)")
    p.add_argument("--storage", default=None,
                   help="--engine optuna: the Optuna RDB storage shared by all workers, a file (SQLite) or an "
                        "SQLAlchemy URL such as postgresql://host/db (default: the --store database)")
    p.add_argument("--study-name", default=None,
                   help="--engine optuna: the Optuna study (default: steepest-bench-<hash of the plan>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_bench)
    sub = p.add_subparsers(dest="bench_command")
    pr = sub.add_parser("report", help="re-render the report of the last suite from the store (runs nothing)")
    _add_common(pr)
    pr.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    pr.set_defaults(func=cmd_report)
    pt = sub.add_parser("targets", help="set targets and budgets (tune AdamW/NAdamW/Nesterov, rerun best with seeds)")
    pt.add_argument("--workloads", "--workload", default=None, help="workloads (default: all built-in)")
    pt.add_argument("--trials", type=int, default=12, help="Halton trials per baseline (default 12)")
    pt.add_argument("--seeds", type=int, default=3, help="reruns of the best configuration (default 3)")
    pt.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per core)")
    pt.add_argument("--store", default=None, help=f"results store (default {DEFAULT_STORE})")
    pt.add_argument("--write", default=None, metavar="DIR",
                    help="write targets_v<N+1>.json into DIR (default: only print it)")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.set_defaults(func=cmd_targets)
    pk = sub.add_parser("worker", help="join a shared Optuna study (--engine optuna) and run its waiting trials",
                        description="Run the waiting trials of a steepest-bench Optuna study, one at a time per job, "
                                    "writing each record to the suite's results store. Start one on every machine.")
    pk.add_argument("--storage", required=True, help="the Optuna RDB storage: a file (SQLite) or an SQLAlchemy URL")
    pk.add_argument("--study-name", "--study", default=None,
                    help="the study (default: every steepest-bench study in the storage with trials waiting)")
    pk.add_argument("--store", default=None,
                    help="results store (default: the one the suite's `steepest bench --engine optuna` recorded)")
    pk.add_argument("--jobs", type=int, default=None, help="worker processes on this machine (default: one per core)")
    pk.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long for a study with trials waiting to appear (default: do not wait)")
    pk.set_defaults(func=cmd_worker)
    pw = sub.add_parser("workloads", help="list the built-in workloads with their targets and budgets")
    pw.set_defaults(func=cmd_workloads)
    return p


def _open_store(args) -> Store:
    return Store(args.store or DEFAULT_STORE)


def _print_summary(res, report: Path) -> None:
    print(text_table(SUMMARY_HEAD, summary_rows(res)))
    print(f"\nreport: {report.resolve()}")
    print(f"raw data: {(report.parent / 'results.csv').resolve()}, {(report.parent / 'scores.csv').resolve()}")


def _fail(msg: str) -> int:
    print(f"steepest bench: error: {msg}", file=sys.stderr)
    return 2


def cmd_bench(args: argparse.Namespace) -> int:
    """Run (or resume) the suite and write its report."""
    preset = QUICK if args.suite == "quick" else FULL
    trials = args.trials or preset["trials"]
    studies = args.studies or preset["studies"]
    seeds = args.seeds or preset["seeds"]
    workloads = _split(args.workloads) or builtin_names()
    optimizers = _split(args.optimizers) or [o for o in QUICK_OPTIMIZERS if o in REGISTRY]
    try:
        for w in workloads:
            get_workload(w)
        for o in optimizers:
            OptimizerSpec(o)
        store = _open_store(args)
    except (KeyError, ValueError, ImportError, TypeError, RuntimeError, StoreError) as err:
        return _fail(err.args[0] if isinstance(err, KeyError) else str(err))
    jobs = args.jobs or default_jobs()
    out = Path(args.out or DEFAULT_OUT)
    print(f"steepest bench: {len(workloads)} workloads x {len(optimizers)} optimizers x {studies} studies x "
          f"{trials} trials x {seeds} seeds, {jobs} jobs; store {store.url}; report -> {out}/", flush=True)
    t0 = time.perf_counter()
    try:
        res = run_suite(workloads, optimizers, trials, studies, seeds, store, jobs=jobs, progress=not args.quiet,
                        engine=args.engine, ray_address=args.ray_address, storage=args.storage,
                        study_name=args.study_name)
    except ImportError as err:
        return _fail(str(err))
    except (ValueError, RuntimeError) as err:
        if args.engine == "local":
            raise
        return _fail(str(err))
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are in the store; run the same command again to resume",
              file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - t0
    report = write_report(res, out, plots=not args.no_plots, elapsed_s=elapsed)
    n = len(res.records)
    print(f"{n} trials in {elapsed:.1f} s ({60 * n / max(elapsed, 1e-9):.0f} trials/min incl. stored ones)\n")
    _print_summary(res, report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Re-render the report of the last suite from the store."""
    try:
        store = _open_store(args)
        res = suite_from_store(store)
    except (ValueError, StoreError, KeyError, ImportError) as err:
        return _fail(str(err))
    missing = len(res.plan) - len({p.key for p in res.plan if p.key in res.records})
    if missing:
        print(f"note: {missing} planned trials are not in the store yet (run `steepest bench` to finish them)")
    report = write_report(res, Path(args.out or DEFAULT_OUT), plots=not args.no_plots)
    _print_summary(res, report)
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    """Run the target-setting procedure and print (or write) the new versioned targets file."""
    import json

    from .targets import set_targets, write_targets
    try:
        workloads = _split(args.workloads) or builtin_names()
        for w in workloads:
            get_workload(w)
        store = _open_store(args)
    except (KeyError, ValueError, ImportError, StoreError) as err:
        return _fail(err.args[0] if isinstance(err, KeyError) else str(err))
    doc = set_targets(workloads, store, trials=args.trials, seeds=args.seeds, jobs=args.jobs or default_jobs(),
                      progress=not args.quiet)
    if args.write:
        print(f"wrote {write_targets(doc, args.write)}")
    else:
        print(json.dumps(doc, indent=1, sort_keys=True))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Join shared Optuna studies and run their waiting trials until none is left."""
    try:
        from .optuna_engine import find_studies, run_workers
        deadline = time.monotonic() + max(0.0, args.wait)
        while True:
            names = [args.study_name] if args.study_name else find_studies(args.storage)
            if names or time.monotonic() >= deadline:
                break
            time.sleep(2.0)
        if not names:
            print(f"steepest bench worker: no steepest-bench study with trials waiting in {args.storage}")
            return 0
        jobs = args.jobs or default_jobs()
        t0 = time.perf_counter()
        ran = 0
        for name in names:
            print(f"steepest bench worker: study {name}, {jobs} jobs", flush=True)
            ran += run_workers(args.storage, name, args.store, jobs=jobs)
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are in the store; re-run the suite's `steepest bench --engine optuna "
              "...` to re-queue the others", file=sys.stderr)
        return 130
    except (ImportError, ValueError, RuntimeError, KeyError, StoreError) as err:
        return _fail(err.args[0] if isinstance(err, KeyError) else str(err))
    print(f"steepest bench worker: ran {ran} trials in {time.perf_counter() - t0:.1f} s; "
          "`steepest bench report --store ...` renders the suite")
    return 0


def cmd_workloads(args: argparse.Namespace) -> int:
    """List the built-in workloads."""
    rows = []
    for n in builtin_names():
        w = get_workload(n)
        t = "-" if w.target is None else f"{w.target:g}"
        rows.append([n, w.kind, w.metric, w.mode, t, str(w.budget), "-" if w.optimum is None else f"{w.optimum:.4g}"])
    print(text_table(("workload", "kind", "metric", "better", "target", "budget", "optimum"), rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``bench`` standalone (``python -m steepest.bench.cli ...``), as the ``steepest bench`` command does."""
    parser = argparse.ArgumentParser(prog="steepest")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

