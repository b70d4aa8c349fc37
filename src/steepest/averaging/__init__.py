"""Weight averaging: EMA (optionally with decay warm-up), SWA with BatchNorm update, and Switch-EMA.

```python
from steepest.averaging import EMA, SWA, SwitchEMA, update_bn
ema = EMA(model, decay=0.999, warmup=True)
for x, y in loader:
    ...; opt.step(); ema.update_parameters(model)
with ema.swapped(model):          # evaluate the averaged weights in place
    evaluate(model)
```
Works with any optimizer; checkpoints share ``torch.optim.swa_utils.AveragedModel``'s keys.
"""

from .averaged import EMA, SWA, AveragedWeights, SwitchEMA, ema_decay, update_bn

__all__ = ["AveragedWeights", "EMA", "SWA", "SwitchEMA", "update_bn", "ema_decay"]
