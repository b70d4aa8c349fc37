"""Curvature instruments: Hessian / GGN / Fisher operators, Hutchinson traces, Lanczos eigenpairs,
stochastic Lanczos quadrature, sharpness tracking and loss-landscape slices.

```python
from steepest import curvature as C
H = C.hessian(model, loss_fn, data)        # data: iterable of (inputs, targets) batches
vals, vecs = C.top_eigenvalues(H, k=3)
est = C.trace(H, tol=1e-2)
grid, density = C.spectral_density(H)
```
"""

from .density import SpectralDensity, plot_density, spectral_density
from .eigen import LanczosResult, lanczos, power_iteration, top_eigenvalues
from .hutchinson import Estimate, block_traces, diagonal, trace
from .landscape import (
    eigen_directions,
    interpolate,
    loss_slice_1d,
    loss_slice_2d,
    plot_slice_1d,
    plot_slice_2d,
    random_direction,
)
from .operators import (
    CurvatureError,
    CurvatureOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    NotTwiceDifferentiableError,
    evaluate_loss,
    fisher,
    ggn,
    hessian,
)
from .sharpness import SharpnessTracker, gradient_overlap

__all__ = [
    "CurvatureError", "CurvatureOperator", "Estimate", "FisherOperator", "GGNOperator", "HessianOperator",
    "LanczosResult", "NotTwiceDifferentiableError", "SharpnessTracker", "SpectralDensity", "block_traces",
    "diagonal", "eigen_directions", "evaluate_loss", "fisher", "ggn", "gradient_overlap", "hessian",
    "interpolate", "lanczos", "loss_slice_1d", "loss_slice_2d", "plot_density", "plot_slice_1d", "plot_slice_2d",
    "power_iteration", "random_direction", "spectral_density", "top_eigenvalues", "trace",
]
