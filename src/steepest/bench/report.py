"""The benchmark report: results.csv, scores.csv, PNG plots, a Markdown page and one self-contained HTML page.

Shows the measures of AlgoPerf (Dahl et al. 2023, arXiv 2306.07179): time-to-target in steps (primary),
seconds and ms/step beside it, performance profiles (Dolan & More 2002) and the benchmark score.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import measures as M
from .store import RAISED
from .suite import SuiteResult
from .workloads.base import get_workload

RESULTS_COLUMNS = ("workload", "optimizer", "study", "trial", "seed", "hyperparameters", "reached", "steps_to_target",
                   "best_metric", "final_metric", "diverged", "ms_per_step")


def _fmt(x, digits=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}g}"
    return str(x)


def write_results_csv(res: SuiteResult, path: Path) -> None:
    """One row per trial (DESIGN.md section 8): enough to recompute the ranking from the raw trials."""
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(RESULTS_COLUMNS)
        for p in res.plan:
            r = res.records.get(p.key)
            if r is None:
                continue
            wr.writerow([p.workload, p.optimizer, p.study, p.trial, p.seed, json.dumps(p.hparams, sort_keys=True),
                         int(r.reached), "" if r.steps_to_target is None else r.steps_to_target,
                         _fmt(r.best_metric, 8), _fmt(r.final_metric, 8), int(r.diverged), f"{r.ms_per_step:.4f}"])


def write_scores_csv(res: SuiteResult, path: Path) -> None:
    """One row per optimizer: time-to-target (steps) per workload, score, speed-up vs AdamW."""
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["optimizer", *[f"steps_to_target[{w}]" for w in res.workloads], "score",
                     "geomean_speedup_vs_adamw", "speedup_workloads"])
        for o in res.ranking():
            sp, n = res.speedups[o]
            wr.writerow([o, *[_fmt(res.times[o].get(w, math.inf), 8) for w in res.workloads], f"{res.scores[o]:.6f}",
                         _fmt(sp, 6), n])


def summary_rows(res: SuiteResult) -> list[list[str]]:
    """The summary table: optimizer, score, workloads reached, speed-up vs AdamW, median ms/step, state bytes."""
    rows = []
    for o in res.ranking():
        cells = [res.cells[(w, o)] for w in res.workloads if (w, o) in res.cells]
        reached = sum(math.isfinite(c.steps_to_target) for c in cells)
        sp, n = res.speedups[o]
        ms = [c.ms_per_step for c in cells if not math.isnan(c.ms_per_step)]
        sb = [c.state_bytes_per_param for c in cells if not math.isnan(c.state_bytes_per_param)]
        div = np.mean([c.divergence_fraction for c in cells]) if cells else math.nan
        rows.append([o, f"{res.scores[o]:.3f}", f"{reached}/{len(res.workloads)}",
                     f"{_fmt(sp, 3)} ({n})", _fmt(float(np.median(ms)) if ms else math.nan, 3),
                     _fmt(float(np.median(sb)) if sb else math.nan, 3), f"{div:.2f}"])
    return rows


SUMMARY_HEAD = ("optimizer", "score", "reached", "speed-up vs adamw (n)", "ms/step", "state B/param", "diverged")
CELL_HEAD = ("optimizer", "steps to target", "ratio", "seconds to target", "best metric", "final metric",
             "diverged", "ms/step", "state B/param", "best hyperparameters")


def cell_rows(res: SuiteResult, w: str) -> list[list[str]]:
    """Per-workload table rows, best time first."""
    cells = [res.cells[(w, o)] for o in res.optimizers if (w, o) in res.cells]
    cells.sort(key=lambda c: (c.steps_to_target, c.best_metric))
    return [[c.optimizer, _fmt(c.steps_to_target), _fmt(c.ratio, 3), _fmt(c.seconds_to_target, 3),
             _fmt(c.best_metric), _fmt(c.final_metric), f"{c.divergence_fraction:.2f}", _fmt(c.ms_per_step, 3),
             _fmt(c.state_bytes_per_param, 3), json.dumps(c.best_hparams, sort_keys=True)] for c in cells]


FAILED_HEAD = ("workload", "optimizer", "trials that raised", "first error")


def failed_rows(res: SuiteResult) -> list[list[str]]:
    """One row per (workload, optimizer) cell with trials whose training raised an exception.

    Such trials count as diverged in the scores; this table keeps a crash (an unsupported operation, a bug)
    from passing as a numerical divergence.
    """
    cells: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p in res.plan:
        r = res.records.get(p.key)
        if r is not None and r.error.startswith(RAISED):
            cells[(p.workload, p.optimizer)].append(r.error[len(RAISED):].splitlines()[0])
    return [[w, o, str(len(errs)), errs[0][:200]] for (w, o), errs in sorted(cells.items())]


def text_table(head, rows) -> str:
    """A plain-text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * wd for wd in widths]), *[line(r) for r in rows]])


# ------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _best_trials(res: SuiteResult, w: str, o: str):
    """Records of the best trial of each study (for seed / study bands)."""
    by = defaultdict(list)
    for p in res.plan:
        if p.workload == w and p.optimizer == o and p.key in res.records:
            by[(p.study, p.trial)].append(res.records[p.key])
    mode = get_workload(next(s for s in res.config["workloads"] if get_workload(s).name == w)).mode
    best = {}
    for (study, _), rs in by.items():
        r = rs[0]
        t = r.steps_to_target if r.reached else math.inf
        bm = r.best_metric if not math.isnan(r.best_metric) else math.inf
        rank = (t, bm if mode == "min" else -bm)
        if study not in best or rank < best[study][0]:
            best[study] = (rank, rs)
    return [r for _, rs in best.values() for r in rs]


def plot_curves(res: SuiteResult, w: str, path: Path) -> None:
    """Train loss and validation metric vs steps, and metric vs seconds: median with min-max band over
    the best trial of each study (and seeds)."""
    plt = _plt()
    wl = get_workload(next(s for s in res.config["workloads"] if get_workload(s).name == w))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for o in res.optimizers:
        recs = [r for r in _best_trials(res, w, o) if r.log]
        if not recs:
            continue
        n = min(len(r.log) for r in recs)
        steps = np.array([row[0] for row in recs[0].log[:n]])
        for ax, col, xs in ((axes[0], 2, steps), (axes[1], 3, steps)):
            ys = np.array([[row[col] for row in r.log[:n]] for r in recs])
            (line,) = ax.plot(xs, np.median(ys, 0), label=o)
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
        secs = np.median(np.array([[row[1] for row in r.log[:n]] for r in recs]), 0)
        ys = np.array([[row[3] for row in r.log[:n]] for r in recs])
        (line,) = axes[2].plot(secs, np.median(ys, 0), label=o)
        axes[2].fill_between(secs, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
    for ax, (xl, yl) in zip(axes, (("steps", "train loss"), ("steps", wl.metric), ("train seconds", wl.metric))):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_yscale("log")
        if yl == wl.metric and wl.target is not None:
            ax.axhline(wl.target, color="k", ls="--", lw=1, label="target")
    axes[1].legend(fontsize=7)
    _save(plt, fig, path, f"{w}: best trial per study (line: median, band: min-max)")


def plot_profiles(res: SuiteResult, path: Path) -> None:
    """Performance profiles rho(tau) over tau in [1, 4] (Dolan & More 2002; AlgoPerf)."""
    plt = _plt()
    taus = np.linspace(1.0, M.R_MAX, 301)
    prof = M.performance_profile(res.ratios, taus)
    fig, ax = plt.subplots(figsize=(6, 4))
    for o in res.ranking():
        ax.step(taus, prof[o], where="post", label=f"{o} (score {res.scores[o]:.3f})")
    ax.set_xlabel("tau (time / best time)")
    ax.set_ylabel("fraction of workloads within tau")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Performance profiles")
    _save(plt, fig, path)


def _grid(n):
    cols = min(4, n)
    return (n + cols - 1) // cols, cols


def _workload_grid(plt, n: int):
    """A figure with one panel per workload, four to a row."""
    rows, cols = _grid(n)
    return plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)


def _save(plt, fig, path: Path, title: str | None = None, axes=None, used: int | None = None) -> None:
    """Blank the panels past ``used``, put the legend on the first, title, lay out and write the figure."""
    if axes is not None:
        for ax in list(axes.flat)[used:]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_lr_sensitivity(res: SuiteResult, path: Path) -> None:
    """Best validation metric of every trial against its learning rate, per workload and optimizer."""
    plt = _plt()
    fig, axes = _workload_grid(plt, len(res.workloads))
    for ax, w in zip(axes.flat, res.workloads):
        for o in res.optimizers:
            pts = sorted((p.hparams.get("lr", math.nan), res.records[p.key].best_metric) for p in res.plan
                         if p.workload == w and p.optimizer == o and p.key in res.records)
            pts = [(x, y if math.isfinite(y) else math.nan) for x, y in pts]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, lw=0.8, label=o)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(w, fontsize=9)
        ax.set_xlabel("lr", fontsize=8)
    _save(plt, fig, path, "Learning-rate sensitivity: best validation metric per trial (missing = diverged)",
          axes, len(res.workloads))


def plot_best_so_far(res: SuiteResult, path: Path) -> None:
    """Best-so-far validation metric against the number of trials (median over studies)."""
    plt = _plt()
    fig, axes = _workload_grid(plt, len(res.workloads))
    for ax, w in zip(axes.flat, res.workloads):
        mode = get_workload(next(s for s in res.config["workloads"] if get_workload(s).name == w)).mode
        for o in res.optimizers:
            studies = defaultdict(dict)
            for p in res.plan:
                if p.workload == w and p.optimizer == o and p.key in res.records and p.seed_index == 0:
                    v = res.records[p.key].best_metric
                    studies[p.study][p.trial] = v if math.isfinite(v) else (math.inf if mode == "min" else -math.inf)
            if not studies:
                continue
            curves = []
            for s in studies.values():
                vals = [s[t] for t in sorted(s)]
                acc = np.minimum.accumulate(vals) if mode == "min" else np.maximum.accumulate(vals)
                curves.append(acc)
            n = min(len(c) for c in curves)
            ax.plot(np.arange(1, n + 1), np.median([c[:n] for c in curves], 0), "-", label=o)
        ax.set_yscale("log")
        ax.set_title(w, fontsize=9)
        ax.set_xlabel("trials", fontsize=8)
    _save(plt, fig, path, "Best-so-far validation metric vs number of trials (median over studies)",
          axes, len(res.workloads))


# ------------------------------------------------------------------------------------------------- pages
_EXPLAIN = (
    "Each optimizer was tuned the way AlgoPerf's external-tuning track prescribes (Dahl et al. 2023, "
    "arXiv 2306.07179): on every workload, {studies} independent study(ies) of {trials} quasi-random (Halton) "
    "trials over the optimizer's own search space, {seeds} seed(s) each, all with 5% linear warmup and cosine "
    "decay. A trial's time is the number of optimizer steps until the validation metric first reaches the "
    "workload's frozen target (infinite if never, within the step budget). An optimizer's time on a workload "
    "is the median over studies of its best trial's time. The performance ratio is that time divided by the "
    "fastest optimizer's; ratios above 4 count as failures. The score is the normalized area under the "
    "performance profile for tau in [1, 4]: 1 = fastest everywhere, 0 = never within 4x of the fastest. "
    "Steps are the primary time axis (deterministic on a shared machine); seconds and ms/step are shown "
    "beside them and depend on machine load.")


def _html_table(head, rows) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(res: SuiteResult, out: str | Path, plots: bool = True, elapsed_s: float | None = None) -> Path:
    """Write results.csv, scores.csv, PNG plots, report.md and a self-contained report.html into ``out``.

    Returns the path of report.html.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results_csv(res, out / "results.csv")
    write_scores_csv(res, out / "scores.csv")
    images: list[tuple[str, str]] = []
    if plots and res.cells:
        plot_profiles(res, out / "profiles.png")
        images.append(("Performance profiles", "profiles.png"))
        plot_lr_sensitivity(res, out / "lr_sensitivity.png")
        images.append(("Learning-rate sensitivity", "lr_sensitivity.png"))
        plot_best_so_far(res, out / "best_so_far.png")
        images.append(("Best so far vs number of trials", "best_so_far.png"))
        for w in res.workloads:
            plot_curves(res, w, out / f"curves_{w}.png")
    cfg = res.config
    explain = _EXPLAIN.format(studies=cfg["studies"], trials=cfg["trials"], seeds=cfg["seeds"])
    n_trials = len(res.records)
    meta = (f"{n_trials} trials in the store for this suite; workloads: {', '.join(res.workloads)}; optimizers: "
            f"{', '.join(res.optimizers)}; {os.cpu_count()} CPU cores seen"
            + (f"; this run took {elapsed_s:.0f} s wall-clock" if elapsed_s is not None else "") + ".")
    ranking = res.ranking()
    verdict = (f"On these {len(res.workloads)} workloads, **{ranking[0]}** scored best ({res.scores[ranking[0]]:.3f})."
               if ranking else "No results.")
    unreached = [w for w in res.workloads if not any(math.isfinite(res.times[o].get(w, math.inf))
                                                      for o in res.optimizers)]
    if unreached:
        verdict += f" No optimizer reached the target on {len(unreached)} workload(s): {', '.join(unreached)}."
    edges = edge_cells(res)
    if edges:
        verdict += (f" In {len(edges)} of {len(res.cells)} (workload, optimizer) cells the best learning rate lies in "
                    "the top or bottom 10% of the optimizer's search space: that space may be too narrow for the "
                    "problem (see the learning-rate sensitivity plot).")
    failed = failed_rows(res)
    if failed:
        n_failed = sum(int(r[2]) for r in failed)
        verdict += (f" {n_failed} trial(s) in {len(failed)} cell(s) raised an exception and count as diverged "
                    "(see Failed trials).")
    md = ["# steepest bench report", "", verdict.replace("**", "**"), "", explain, "", meta, "", "## Summary", "",
          _md_table(SUMMARY_HEAD, summary_rows(res)), "",
          "Files: `results.csv` (one row per trial), `scores.csv` (one row per optimizer).", ""]
    body = [f"<h1>steepest bench report</h1><p class=verdict>{html.escape(verdict).replace('**', '')}</p>",
            f"<p>{html.escape(explain)}</p><p class=meta>{html.escape(meta)}</p>", "<h2>Summary</h2>",
            _html_table(SUMMARY_HEAD, summary_rows(res)),
            "<p>Raw data beside this page: <code>results.csv</code> (one row per trial) and <code>scores.csv</code> "
            "(one row per optimizer), enough to recompute the ranking.</p>"]
    if failed:
        md += ["## Failed trials", "", _md_table(FAILED_HEAD, failed), ""]
        body += ["<h2>Failed trials</h2>", _html_table(FAILED_HEAD, failed)]
    for title, name in images:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
        body.append(f"<h2>{html.escape(title)}</h2>{_img(out / name)}")
    md.append("## Workloads")
    body.append("<h2>Workloads</h2>")
    for spec in cfg["workloads"]:
        wl = get_workload(spec)
        w = wl.name
        better = "lower" if wl.mode == "min" else "higher"
        desc = (f"{wl.description} Metric: {wl.metric} ({better} is better), "
                f"target {_fmt(wl.target)}, budget {wl.budget} steps, evaluated every {wl.eval_every} steps"
                + (f", best possible {_fmt(wl.optimum)}" if wl.optimum is not None else "")
                + f"; version {wl.version}.")
        md += ["", f"### {w}", "", desc, "", _md_table(CELL_HEAD, cell_rows(res, w)), ""]
        body += [f"<h3>{html.escape(w)}</h3><p>{html.escape(desc)}</p>", _html_table(CELL_HEAD, cell_rows(res, w))]
        if plots and (out / f"curves_{w}.png").exists():
            md += [f"![{w}](curves_{w}.png)", ""]
            body.append(_img(out / f"curves_{w}.png"))
    (out / "report.md").write_text("\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#f0f0f0}.verdict{font-size:1.2em}.meta{color:#666}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>steepest bench report</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")
    (out / "report.html").write_text(page)
    return out / "report.html"


def edge_cells(res: SuiteResult, margin: float = 0.1) -> list[tuple[str, str]]:
    """Cells whose best trial's lr lies within ``margin`` (fraction of the log-range) of its search-space bounds."""
    from .space import OptimizerSpec
    out = []
    for (w, o), c in res.cells.items():
        try:
            space = OptimizerSpec(o).space
        except Exception:  # noqa: BLE001 - a store may name an optimizer no longer importable
            continue
        lr = c.best_hparams.get("lr")
        if lr is None or "lr" not in space or space["lr"][0] != "log":
            continue
        lo, hi = math.log(space["lr"][1]), math.log(space["lr"][2])
        u = (math.log(lr) - lo) / (hi - lo)
        if u < margin or u > 1 - margin:
            out.append((w, o))
    return out


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
