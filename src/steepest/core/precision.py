"""Low-precision storage: float32 working copies and stochastic rounding back to bfloat16.

Stochastic rounding (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision",
arXiv 1502.02551; used for bf16 optimizer states by Zamirai et al. 2020, arXiv 2010.06192) rounds
x up or down to a neighbouring bfloat16 value with probabilities proportional to the distance, so
that E[round(x)] = x and updates smaller than half a bf16 ulp are not lost on average.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_low_precision(dtype: torch.dtype) -> bool:
    """True for 16-bit floating types whose updates need float32 arithmetic."""
    return dtype in LOW_PRECISION


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in for values stored as dtype."""
    if is_low_precision(dtype):
        return torch.float32
    return dtype


def as_real(t: Tensor) -> Tensor:
    """A complex tensor viewed as real (a trailing dimension of 2); any other tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def working_copy(t: Tensor) -> Tensor:
    """t in its working dtype: a float32 copy of 16-bit storage, else t itself."""
    return t.float() if is_low_precision(t.dtype) else t


def working_copies(p: Tensor, state: dict, maximize: bool) -> dict:
    """Working copies of a param (complex viewed as real), its gradient (negated under ``maximize``) and its state
    but "step", with the tensors they are written back to: keys home, param, grad, state, home_state, step."""
    home = as_real(p)
    grad = working_copy(as_real(p.grad))
    return {"home": home, "param": working_copy(home), "grad": -grad if maximize else grad,
            "state": {k: working_copy(v) for k, v in state.items() if k != "step"}, "home_state": state,
            "step": state["step"]}


def stochastic_round_to_bf16(x: Tensor) -> Tensor:
    """Round a float32 tensor to bfloat16 stochastically (unbiased); NaN and Inf pass unchanged.

    bfloat16 is the upper half of a float32; adding uniform random bits to the lower 16 bits and
    truncating rounds away from zero with probability equal to the discarded fraction.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes float32 input, got {x.dtype}")
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    # Values within half an ulp of the float32 maximum would round to inf, and NaN/Inf must stay as they
    # are: take round-to-nearest there.
    return torch.where(torch.isfinite(rounded), rounded, x).to(torch.bfloat16)


def write_back_(dst: Tensor, src: Tensor, stochastic: bool) -> None:
    """Store a float32 working value into its (possibly lower-precision) home tensor."""
    if dst.dtype == src.dtype:
        if dst is not src:
            dst.copy_(src)
    elif stochastic and dst.dtype == torch.bfloat16:
        dst.copy_(stochastic_round_to_bf16(src))
    else:
        dst.copy_(src)
