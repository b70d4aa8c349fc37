"""Low-precision storage: float32 working copies and stochastic rounding back to bfloat16.

Stochastic rounding (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision",
arXiv 1502.02551; used for bf16 optimizer states by Zamirai et al. 2020, arXiv 2010.06192) rounds
x up or down to a neighbouring bfloat16 value with probabilities proportional to the distance, so
that E[round(x)] = x and updates smaller than half a bf16 ulp are not lost on average.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "privateuseone")
AutocastRegion = tuple[str, torch.dtype, bool]
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def autocast_regions() -> list[AutocastRegion]:
    """(device type, dtype, cache enabled) of every ``torch.autocast`` region the caller is in."""
    any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)
    if any_enabled is not None and not any_enabled():
        return []
    return [(d, torch.get_autocast_dtype(d), torch.is_autocast_cache_enabled()) for d in _AUTOCAST_DEVICES
            if torch.is_autocast_enabled(d)]


@contextlib.contextmanager
def autocast_off(regions: list[AutocastRegion] | None = None) -> Iterator[None]:
    """Leave the given autocast regions (default: all the caller is in) for the body."""
    with contextlib.ExitStack() as stack:
        for device, _, _ in autocast_regions() if regions is None else regions:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


@contextlib.contextmanager
def autocast_on(regions: list[AutocastRegion]) -> Iterator[None]:
    """Enter the given autocast regions again (those :func:`autocast_regions` returned) for the body."""
    with contextlib.ExitStack() as stack:
        for device, dtype, cache in regions:
            stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=cache))
        yield


def outside_autocast(fn: _Fn) -> _Fn:
    """``fn`` run outside any autocast region its caller is in: a statistic a hook takes during the caller's
    forward or backward keeps the precision ``fn`` computes it in (autocast would run its matrix products in
    16 bits)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with autocast_off():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


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
    truncating rounds away from zero with probability equal to the discarded fraction. Each element's 16 random
    bits are uniform and drawn afresh at every call; how they are made differs eager and compiled (see
    :func:`_table_noise16` and :func:`_hashed_noise16`: one random number per element from torch's generator
    costs ~4 ns on a CPU, 10-20x the rest of an optimizer step).
    """
    return _stochastically_rounded(x).to(torch.bfloat16)


_BF16_MAX = 3.3895313892515355e38


def _stochastically_rounded(x: Tensor) -> Tensor:
    """:func:`stochastic_round_to_bf16` as float32 values that bfloat16 holds exactly (a copy into bfloat16
    storage converts them without another rounding)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes float32 input, got {x.dtype}")
    if _compiling():
        rounded = ((x.view(torch.int32) + _hashed_noise16(x)) & -65536).view(torch.float32)
    else:
        x = x.contiguous()
        rounded = _table_noise16(x).add_(x.view(torch.int32)).bitwise_and_(-65536).view(torch.float32)
        # Eager on the CPU, one read-only pass tells whether any value needs the fix-up below (isfinite and where
        # over 2**18 floats: 360 us, aminmax 23 us; NaN propagates into both ends); elsewhere that test would wait
        # on the device.
        if x.device.type == "cpu" and x.numel() > 0:
            low, high = torch.aminmax(x)
            if -_BF16_MAX <= low.item() and high.item() <= _BF16_MAX:
                return rounded
    # Values above the largest bfloat16 would round to inf, and NaN/Inf must stay as they are: take
    # round-to-nearest there.
    return torch.where(torch.isfinite(rounded), rounded, x)


def _compiling() -> bool:
    from .multitensor import compiling

    return compiling()


def _hashed_noise16(x: Tensor) -> Tensor:
    """Uniform 16-bit integers, one per element of x, for a compiled kernel: an integer hash of the element's index
    and a seed drawn from torch's generator at each call.

    A compiled kernel draws ``torch.randint_like`` through a Philox generator called once per element, ~30x the
    cost of the rest of a fused AdamW step with bfloat16 states; the hash is a few vectorised int32 operations
    (multiplications wrap modulo 2**32; the right shifts are masked to act as unsigned ones)."""
    seed = torch.randint(-(1 << 31), (1 << 31) - 1, (1,), dtype=torch.int32, device=x.device)
    h = torch.arange(x.numel(), dtype=torch.int32, device=x.device).view(x.shape) * -1640531535 + seed
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x7FEB352D
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * -2073254261
    h = h ^ ((h >> 16) & 0xFFFF)
    return h & 0xFFFF


_NOISE_SEGMENT = 1 << 18
_noise_tables: dict[torch.device, Tensor] = {}


def _table_noise16(x: Tensor) -> Tensor:
    """Uniform 16-bit integers, one per element of a contiguous x, for the eager path: t xor s with t
    read from a fixed table of random 16-bit values at a random offset, and s drawn from torch's generator at each
    call, per segment of 2**18 elements.

    Given the table, each element's value is uniform because s is, and independent of every earlier call's because
    each call draws its s afresh: the rounding stays unbiased step after step. The table makes neighbouring
    elements' values differ (without it a constant tensor would round all one way). One integer pass over x,
    against ~4 ns an element for torch.randint_like's generator."""
    table = _noise_tables.get(x.device)
    if table is None:
        g = torch.Generator().manual_seed(0x5EED)
        table = torch.randint(0, 1 << 16, (2 * _NOISE_SEGMENT,), generator=g, dtype=torch.int32).to(x.device)
        _noise_tables[x.device] = table
    n = x.numel()
    segments = -(-n // _NOISE_SEGMENT)
    offsets = torch.randint(0, _NOISE_SEGMENT, (segments,)).tolist()
    shifts = torch.randint(0, 1 << 16, (segments,)).tolist()
    noise = torch.empty(n, dtype=torch.int32, device=x.device)
    for k in range(segments):
        start = k * _NOISE_SEGMENT
        size = min(_NOISE_SEGMENT, n - start)
        torch.bitwise_xor(table[offsets[k]:offsets[k] + size], shifts[k], out=noise[start:start + size])
    return noise.view(x.shape)


def write_back_(dst: Tensor, src: Tensor, stochastic: bool) -> None:
    """Store a float32 working value into its (possibly lower-precision) home tensor."""
    if dst.dtype == src.dtype:
        if dst is not src:
            dst.copy_(src)
    elif stochastic and dst.dtype == torch.bfloat16:
        dst.copy_(_stochastically_rounded(src))
    else:
        dst.copy_(src)
