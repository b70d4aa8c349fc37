"""``steepest bench``: an honest optimizer benchmark after AlgoPerf (Dahl et al. 2023, arXiv 2306.07179) and
DeepOBS (Schneider et al. 2019, arXiv 1903.05499), scaled to a CPU.

Public pieces: :class:`Workload` (the protocol for your own problem), :func:`get_workload`,
:func:`run_trial`, :func:`run_suite`, :class:`Store`, :func:`write_report` and :mod:`measures`.
"""

from . import measures
from .report import write_report
from .store import Store, StoreError
from .suite import SuiteResult, run_suite, suite_from_store
from .trial import TrialResult, run_trial, warmup_cosine
from .workloads.base import Workload, builtin_names, get_workload

__all__ = ["Workload", "get_workload", "builtin_names", "run_trial", "run_suite", "suite_from_store", "Store",
           "StoreError", "SuiteResult", "TrialResult", "warmup_cosine", "write_report", "measures"]
