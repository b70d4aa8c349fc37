"""Learning-rate schedules (plain torch LR schedulers over pure, plottable schedule functions) and
batch-size rules.

```python
from steepest import schedules
sched = schedules.wsd(opt, warmup=500, total=20_000, decay=0.2, shape="1-sqrt")   # a torch LRScheduler
schedules.cosine(opt, warmup=100, total=5_000, final_lr_ratio=0.1)
schedules.WSD(total=20_000, warmup=500)(12_345)      # the pure multiplier at a step
schedules.plot_schedules({"cos": schedules.Cosine(total=1000)}, "lr.png")
```
This package imports nothing of ``steepest.optim``: it works with any ``torch.optim.Optimizer``.
"""

from .batch import (
    AdaptiveBatchSize,
    NormTestResult,
    per_sample_grads,
    scale_adam_hyperparameters,
    scale_lr,
    scaling_rule,
)
from .plot import plot_schedules, schedule_values
from .refine import median_smooth, refine_schedule
from .scheduler import (
    OneCycle,
    ScheduleLR,
    constant,
    cosine,
    from_schedule,
    inverse_sqrt,
    linear_decay,
    linear_warmup,
    one_cycle,
    one_cycle_lr,
    refined,
    wsd,
)
from .shapes import (
    COOLDOWN_SHAPES,
    WSD,
    Constant,
    Cosine,
    InverseSqrt,
    Join,
    LinearDecay,
    Schedule,
    Tabulated,
    Warmup,
    from_spec,
)

__all__ = [
    "Schedule", "Constant", "Warmup", "Cosine", "LinearDecay", "InverseSqrt", "WSD", "Tabulated", "Join",
    "from_spec", "COOLDOWN_SHAPES",
    "ScheduleLR", "OneCycle", "one_cycle_lr", "from_schedule", "constant", "linear_warmup", "cosine",
    "linear_decay", "inverse_sqrt", "wsd", "one_cycle", "refined",
    "refine_schedule", "median_smooth",
    "scale_lr", "scale_adam_hyperparameters", "scaling_rule", "AdaptiveBatchSize", "NormTestResult",
    "per_sample_grads",
    "plot_schedules", "schedule_values",
]
