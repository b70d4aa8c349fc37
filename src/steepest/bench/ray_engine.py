"""Optional scale-out of benchmark trials over a Ray cluster (Moritz et al. 2018, arXiv 1712.05889).

``steepest bench --engine ray [--ray-address ADDR]`` fans the missing trials of the plan out as Ray tasks
(one CPU and one torch thread each); the driver stores each record as it arrives, exactly as the local pool
does, so resumption and results are the same. Ray is an optional extra (``pip install ray``); steepest must be
importable on every Ray worker (same version: it is part of each trial's content hash).
"""

from __future__ import annotations

from tqdm import tqdm

from .runner import PlannedTrial, execute
from .store import Store
from .trial import TrialResult


def _ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError("--engine ray needs the optional dependency Ray: pip install 'ray[default]' "
                          "(or use the default local process pool)") from err
    return ray


def run_plan_ray(plan: list[PlannedTrial], store: Store, address: str | None = None, progress: bool = True,
                 max_in_flight: int = 256) -> dict[str, TrialResult]:
    """Run the trials of ``plan`` missing from ``store`` as Ray tasks; store each as it finishes."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    remote_execute = ray.remote(num_cpus=1)(execute)
    done = store.keys(settled=True)
    todo, seen = [], set(done)
    for p in plan:
        if p.key not in seen:
            seen.add(p.key)
            todo.append(p)
    pending: list = []
    bar = tqdm(total=len(todo), desc="steepest bench (ray)", unit="trial", disable=not progress or not todo)
    try:
        queue = list(reversed(todo))
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                pending.append(remote_execute.remote(queue.pop()))
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                store.put(ray.get(ref))
                bar.update()
    finally:
        for ref in pending:
            ray.cancel(ref)
        bar.close()
    return store.get({p.key for p in plan})
