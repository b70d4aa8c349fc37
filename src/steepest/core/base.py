"""The optimizer engine every steepest optimizer stands on.

A method subclasses :class:`Optimizer` and supplies

* ``hyperparams``: a check per hyperparameter (validated for every param group before it is added);
* ``init_state(p, group)``: the per-parameter state buffers;
* ``scalars(group, step)``: the per-step numbers the update needs (learning rate, bias corrections),
  computed once per step in double precision on the host;
* ``static_options(group)``: flags that change the code path (nesterov, amsgrad);
* ``update``: a pure function over lists of tensors ``update(params, grads, **states, **scalars,
  **static)`` written with :mod:`steepest.core.multitensor` helpers.

The base runs that one function in two modes: eager (``torch._foreach_*`` over all tensors of a
bucket) and fused (the same function traced once on stand-in tensors and compiled by inductor into one
kernel per call, without per-call guards, cached per signature, hyperparameters passed as tensors so
that changing them never recompiles). The fused path views tensors as flat vectors (elementwise updates,
a few tensors per call; whole-tensor reductions, one per call) or as (shape[0], rest) matrices (per-row
reductions), so one kernel serves every shape; other updates run eager. Around the update it applies
``maximize``, weight decay (decoupled or L2, as the method states), float32 working copies for 16-bit
params or states, and stochastic rounding on write-back.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from . import checks
from . import multitensor as mt
from .precision import (
    as_real,
    autocast_off,
    autocast_on,
    autocast_regions,
    is_low_precision,
    working_copy,
    working_dtype,
    write_back_,
)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

# Group keys torch.optim and its schedulers add beside the hyperparameters.
_STANDARD_GROUP_KEYS = frozenset({"params", "param_names", "initial_lr", "name"})
_COMPILE_MIN_NUMEL = 1 << 20
# Tensors per compiled call of an elementwise update. Each tensor is one loop of the generated kernel: larger
# kernels compile for longer (AdamW's first step on a fresh machine, benchmarks/first_step.py, runs interleaved:
# 5.0-5.7 s at 2 tensors, 5.8-6.9 s at 4, 6.1-6.2 s at 6 in an earlier window), while at ~10 us per call chunks
# of 1, 2 and 4 tensors stepped equally fast within noise (16.8M params in 40 tensors, same process, interleaved:
# AdamW 8.92-10.07 ms at 2 against 8.93-9.93 ms at 4, Adan 9.81-10.13 against 9.48-10.44).
_FUSE_CHUNK = 2
_EAGER_CHUNK_NUMEL = 1 << 18
# A full-precision tensor from this size up steps eager in pieces (see Optimizer._eager_pieces).
_EAGER_PIECES_NUMEL = 1 << 21
# Tensors from this size count as large for Optimizer.inductor_config_large.
_LARGE_KERNEL_NUMEL = 1 << 23
_compile_counter = 0


def _apply_update(update, params, grads, states, scalars, wd, *, static, maximize, wd_mode, stochastic):
    """maximize, weight decay, float32 working copies, the update itself, and the write-back.

    This is the function ``torch.compile`` traces for the fused path; eager runs call it directly. Returns what
    the update returns: nothing, or (a pass of a global-step method) its per-tensor reductions as a dict of
    lists of 0-dim tensors, one per param.
    """
    if maximize:
        grads = mt.neg(grads)
    if params and not mt.compiling():
        dtype = working_dtype(params[0].dtype)
        scalars, wd = _fit_scalars(scalars, dtype), mt.fit(wd, dtype)
    work_p = [working_copy(p) for p in params]
    work_g = [working_copy(g) for g in grads]
    work_s = {k: [working_copy(s) for s in v] for k, v in states.items()}
    if wd_mode == "decoupled":
        mt.mul_(work_p, wd)
    elif wd_mode == "l2":
        work_g = mt.add(work_g, work_p, alpha=wd)
    outputs = update(work_p, work_g, **work_s, **scalars, **static)
    for p, w in zip(params, work_p):
        write_back_(p, w, stochastic)
    for k, v in states.items():
        for s, w in zip(v, work_s[k]):
            write_back_(s, w, stochastic)
    return outputs


_OUTER_COMPILE_REASON = (
    "steepest optimizers run their update in their own kernels (compile= picks eager or fused): a "
    "torch.compile around step() compiles the rest of the function and calls the step between its graphs")


def _own_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` as every steepest optimizer runs it, whatever surrounds the call:

    - outside any ``torch.autocast`` region the caller is in (a training loop written as one autocast block):
      under it, the matrix and curvature methods' products ran in bfloat16 (a small MLP after 5 steps, relative
      to the step outside: Shampoo 1.1e-2, K-FAC 8e-3, Muon 5e-3, M-FAC 9e-4, SophiaH 4e-4, the Hessian products
      of AdaHessian 0.68 and OASIS 0.74) and SOAP and MKOR failed on float32 states combined with bfloat16
      products. A closure still runs under the caller's autocast (:meth:`Optimizer.call_closure`): its forward
      is the caller's to choose;
    - run by the Python interpreter when a caller's ``torch.compile`` reaches it (a graph break there), not
      traced into the caller's graph: traced, the step count and the scalars drawn from it are constants of the
      graph, so every step recompiled (AdamW 10 graphs in 12 steps, Muon 34 s of compiling) until dynamo's
      recompile limit. Outside, the step runs its eager or fused kernels as it does uncompiled."""

    @functools.wraps(step)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        outer = autocast_regions()
        if not outer:
            return step(self, *args, **kwargs)
        with autocast_off(outer):
            self._caller_autocast = outer
            try:
                return step(self, *args, **kwargs)
            finally:
                self._caller_autocast = None

    try:
        return torch.compiler.disable(run, reason=_OUTER_COMPILE_REASON)
    except TypeError:  # older torch (the range admits 2.4) takes no reason
        return torch.compiler.disable(run)


def _resized_state(p: Tensor, state: Mapping[str, Any], shaped: tuple[str, ...]) -> str | None:
    """The name of p's first state among ``shaped`` (made shaped like the param, or like its real view for a complex
    param) if its shape is no longer p's."""
    for name in shaped:
        v = state.get(name)
        if v is not None:
            same = v.shape == p.shape or (p.is_complex() and v.shape == (*p.shape, 2))
            return None if same else name
    return None


def _refuse_torch_options(name: str, *, foreach: Any, fused: Any, capturable: Any, differentiable: Any) -> None:
    """torch.optim's implementation switches, accepted at torch's defaults (a line written for torch.optim runs
    as it is) and refused otherwise with what to write instead."""
    kernel = ("here compile= chooses the kernel: True runs the update as one compiled (fused) kernel, False as "
              "eager for-each (multi-tensor) ops, 'auto' (the default) compiles from 1M parameters up, "
              "'background' compiles while the first steps run eager")
    if fused is not None:
        raise TypeError(f"{name}: fused={fused!r} is torch.optim's switch for its own kernels; {kernel}")
    if foreach is not None:
        raise TypeError(f"{name}: foreach={foreach!r} is torch.optim's switch for its own kernels; {kernel}")
    if capturable is not False:
        raise TypeError(f"{name}: capturable={capturable!r} (a step captured in a CUDA graph) is not supported; "
                        f"leave it out")
    if differentiable is not False:
        raise TypeError(f"{name}: differentiable={differentiable!r} (autograd through the step) is not supported; "
                        f"leave it out")


def _fit_scalars(scalars: Mapping[str, Any], dtype: torch.dtype) -> Mapping[str, Any]:
    """The step's numbers through :func:`multitensor.fit`: a finite float beyond ``dtype``'s range (a runaway
    adapted step size, an lr of 1e39) becomes the infinity of its sign, as on the compiled path, instead of an
    error in the middle of the step. ``scalars`` itself when every number fits."""
    if all(mt.fit(v, dtype) is v for v in scalars.values()):
        return scalars
    return {k: mt.fit(v, dtype) for k, v in scalars.items()}


def _flat_alias(t: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """A contiguous tensor over t's memory, 1-D or of the given shape, that is not a view and needs no grad.

    Compiled kernels may guard on their inputs' metadata, including a view's base (its shape and rank) and
    requires_grad: flattened views of params of different ranks, or Parameters next to plain scratch
    tensors, would each fail a guard and recompile. Plain aliases make every chunk look alike.
    """
    shape = (t.numel(),) if shape is None else shape
    strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), shape,
                                                                 strides)


def flat_pieces(params: list[Tensor], grads: list[Tensor], states: dict[str, list[Tensor]]) -> list[tuple] | None:
    """One large tensor of an eager run (with its gradient and param-shaped states) as flat slices of
    _EAGER_CHUNK_NUMEL elements, each a (params, grads, states) of one call; None where the run stays whole: more
    than one tensor, a float32 tensor under _EAGER_PIECES_NUMEL elements (16-bit ones from _EAGER_CHUNK_NUMEL up
    are cut: their float32 copies are temporaries too), or a tensor that cannot be viewed flat. Valid for updates
    that are elementwise apart from sums over a tensor's elements (a sum over the pieces is the tensor's)."""
    if len(params) != 1 or params[0].numel() <= _EAGER_CHUNK_NUMEL:
        return None
    tensors = [params[0], grads[0], *(v[0] for v in states.values())]
    low = any(is_low_precision(t.dtype) for t in tensors)
    calls = mt.flat_pieces(params, grads, *states.values(), size=_EAGER_CHUNK_NUMEL,
                           min_numel=_EAGER_CHUNK_NUMEL + 1 if low else _EAGER_PIECES_NUMEL)
    if len(calls) == 1:
        return None
    return [(ps, gs, dict(zip(states, rest))) for ps, gs, *rest in calls]


def chunk_runs(numels: list[int], limit: int = _EAGER_CHUNK_NUMEL) -> list[list[int]]:
    """Consecutive runs of indices into ``numels`` holding about ``limit`` elements each (a larger tensor is a
    run of its own): the eager path works run by run so that its temporaries stay a few MB."""
    runs: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(numels):
        if current and size + n > limit:
            runs.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        runs.append(current)
    return runs


class _FlatChunk(NamedTuple):
    """One call of a flat-path kernel: its layout ("flat": 1-D tensors; "matrix": one tensor viewed as
    (shape[0], rest)), the indices it updates, the shape its gradients are viewed as, its fixed arguments
    (aliases of the params and states, padded to the kernel's slot count with scratch tensors), and the tensors
    whose memory each argument is (None for pads and for the gradients, which the step supplies), with a cache
    of the tensors a kernel's writes land in (:func:`_written_tensors`); ``strided_grads``: some param (and so its
    gradient) is dense but not contiguous (channels_last), and the gradients go in as flat aliases."""

    layout: str
    grad_shape: tuple[int, ...]
    idx: list[int]
    params: list[Tensor]
    grad_pads: list[Tensor]
    states: dict[str, list[Tensor]]
    state_args: list[Tensor]
    homes: list[Tensor | None]
    written_cache: dict[tuple[int, ...] | None, tuple[list[Tensor], tuple[int, ...]]]
    strided_grads: bool = False


class _FusedPlan(NamedTuple):
    """A bucket's compiled-path layout: the addresses it was made for, the fused indices and the kernel calls
    over them, and which of those params are contiguous and which dense in another order (channels_last): their
    gradients must keep that order for the plan to serve."""

    sig: tuple[int, ...]
    order: list[int]
    chunks: list[_FlatChunk]
    contiguous: list[int]
    strided: list[int]


# Tracing keeps process-wide state (torch.fx's patcher, inductor's caches): two kernels compiled at once, say
# two layouts of one optimizer in background threads, fail. Jobs take turns.
_COMPILE_LOCK = threading.Lock()


class _CompileJob:
    """One kernel compiled on stand-in arguments, here or in a daemon thread; ``result`` holds the compiled
    callable once ``done`` is set, ``error`` what stopped the compiler."""

    def __init__(self, compile_fn: Callable[..., Callable], args: tuple, wait: bool) -> None:
        self.done = threading.Event()
        self.result: Callable | None = None
        self.error: BaseException | None = None
        self.pid = os.getpid()
        if wait:
            self._run(compile_fn, args)
        else:
            threading.Thread(target=self._run, args=(compile_fn, args), daemon=True,
                             name="steepest-compile").start()

    @property
    def orphaned(self) -> bool:
        """Pending in a process forked from the one that started it, where no thread will finish it."""
        return self.pid != os.getpid() and not self.done.is_set()

    def _run(self, compile_fn, args) -> None:
        try:
            with _COMPILE_LOCK, torch.no_grad():
                self.result = compile_fn(*args)
        except BaseException as err:  # noqa: BLE001 - reported to the optimizer, which falls back to eager
            self.error = err
        finally:
            self.done.set()


_flat_kernels_compiled = 0


def compiled_graphs() -> int:
    """How many update graphs have been compiled in this process (flat kernels and torch.compile graphs):
    a count that moves only when a step compiled something."""
    from torch._dynamo.utils import counters

    return _flat_kernels_compiled + counters["stats"]["unique_graphs"]


class _NoArtifactWarning(logging.Filter):
    """Drops inductor's warning that a standalone compile could not save its cache artifacts: the engine never
    saves them (kernels compiled concurrently in background threads make that save fail)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "artifact generation failed" not in record.getMessage()


_no_artifact_warning = _NoArtifactWarning()


# None: not settled yet; True: settled from the CPU's report; False: left to inductor's probe.
_cpu_isa_settled: bool | None = None


def _settle_cpu_isa() -> None:
    """Inductor's list of valid CPU vector ISAs, settled once per process from what the CPU reports, before the
    first CPU kernel.

    Inductor's own probe builds and loads test libraries for each ISA the CPU reports (AVX-512 VNNI, AVX-512,
    AVX2 on a recent x86: g++ over the ATen vector headers, ~1 s a library, several per ISA) one after another
    before its first CPU kernel: 2-7 s of a first step on a fresh machine. The CPU's report (torch.cpu's
    cpuinfo-based checks, which include the operating system's support for the registers) is what inductor
    itself trusts in Meta's builds, where it skips the probe; here the list is settled from it the same way
    (``cpp.vec_isa_ok``) unless the user set that option (``TORCHINDUCTOR_VEC_ISA_OK``) or asked for an ISA
    (``ATEN_CPU_CAPABILITY``). With that option set inductor still builds a library for each sub-feature the CPU
    reports (AVX-512 BF16, twice, and VNNI: 1.5 s with an empty inductor cache); the CPU's report answers those
    too. A compiler that cannot build for the chosen ISA fails the kernel's compile, which the engine answers by
    handing the list back to inductor's probe (:func:`_probe_cpu_isa`) and compiling once more. The list is
    process-wide: a ``torch.compile`` of the model on the CPU uses it too.
    """
    global _cpu_isa_settled
    if _cpu_isa_settled is not None:
        return
    _cpu_isa_settled = False
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        return
    try:
        from torch._inductor import config, cpu_vec_isa

        if config.cpp.vec_isa_ok is None and cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 0:
            check_build = cpu_vec_isa.VecISA.check_build
            cpu_vec_isa.VecISA.check_build = lambda self, code: True
            try:
                with config.patch({"cpp.vec_isa_ok": True}):
                    cpu_vec_isa.valid_vec_isa_list()
            finally:
                cpu_vec_isa.VecISA.check_build = check_build
            _cpu_isa_settled = True
    except (ImportError, AttributeError):
        pass


def _forget_isa_checks(cpu_vec_isa: Any) -> None:
    """Clear inductor's cached answers about the CPU's ISAs (the valid list, each ISA's own check and its BF16
    flag), so that its probe asks again."""
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    isas = list(getattr(cpu_vec_isa, "supported_vec_isa_list", []))
    for cls in {cpu_vec_isa.VecISA, *(type(isa) for isa in isas)}:
        for name in ("__bool__", "_VecISA__bool__impl", "is_avx512_bf16_supported"):
            cached = cls.__dict__.get(name)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()
    for isa in isas:
        if "_is_avx512_bf16_supported" in vars(isa):
            isa._is_avx512_bf16_supported = False


def _probe_cpu_isa() -> bool:
    """Hand the valid-ISA list back to inductor's own probe if :func:`_settle_cpu_isa` settled it (a kernel built
    for it failed to compile); True if it did, so that the caller compiles once more."""
    global _cpu_isa_settled
    if not _cpu_isa_settled:
        return False
    _cpu_isa_settled = False
    from torch._inductor import cpu_vec_isa

    _forget_isa_checks(cpu_vec_isa)
    return True


def _forget_threads_in_child() -> None:
    # A child forked while a compile ran has no compile thread: its lock would stay taken. It starts afresh.
    global _COMPILE_LOCK
    _COMPILE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads_in_child)


def _compile_flat(update: Callable, standins: tuple, options: dict[str, Any], probe: bool = True,
                  inductor_config: Mapping[str, Any] | None = None) -> _FlatKernel:
    """The flat path's compiled update: a callable over ``(*params, *grads, *states, *scalars, wd)``.

    The update is traced once on stand-in tensors with symbolic sizes and compiled by inductor without
    dynamo (``torch._inductor.standalone_compile``): no guards are evaluated per call (~16 us a call
    against ~60-110 us through ``torch.compile``, which the engine pays once per chunk per step; ~3 us where
    the generated code is called directly, :func:`_direct_call`). The
    guards' job is the engine's: a kernel is keyed on device, dtypes, code-path options and layout, and it
    is only called on contiguous tensors of its layout (flat, or (rows, cols) matrices) with at least two
    elements; a trace that depends on sizes is refused. Where that API is missing, the same flat function
    goes through ``torch.compile`` and is traced on the stand-ins.
    """
    global _flat_kernels_compiled
    params, grads, states, scalars, wd = standins
    count, names, scalar_names = len(params), list(states), list(scalars)

    realized: list[Tensor] = []
    output_names: list[str] = []

    def flat_update(*flat):
        cut = 2 * count
        states_in = {k: list(flat[cut + j * count: cut + (j + 1) * count]) for j, k in enumerate(names)}
        cut += len(names) * count
        scalars_in = dict(zip(scalar_names, flat[cut:cut + len(scalar_names)]))
        outputs = _apply_update(update, list(flat[:count]), list(flat[count:2 * count]), states_in, scalars_in,
                                flat[-1], **options) or {}
        output_names[:] = sorted(outputs)
        # realized: filled by mt.realize while traced (inductor stores what a graph returns); then the update's
        # own outputs, name by name, one per slot.
        return tuple(realized) + tuple(t for k in output_names for t in outputs[k])

    example = [*params, *grads, *(t for k in names for t in states[k]), *scalars.values(), wd]
    if params[0].device.type == "cpu":
        _settle_cpu_isa()
    standalone = getattr(torch._inductor, "standalone_compile", None)
    if standalone is None:
        kernel = torch.compile(_fresh_code_copy(flat_update, update.__name__), dynamic=True, fullgraph=True)
        kernel(*example)
        kernel = _FlatKernel(kernel, False, tuple(output_names))
    else:
        with mt.tracing(realized):
            graph = make_fx(flat_update, tracing_mode="symbolic")(*example)
        _check_size_generic(graph, example)
        logging.getLogger("torch._inductor.standalone_compile").addFilter(_no_artifact_warning)
        # The engine builds every argument itself (contiguous, of the kernel's layout); per-call size asserts would
        # cost a third of the call.
        patches = {"config_patches": {"size_asserts": False, **(inductor_config or {})}}
        if output_names:
            # A pass that returns reductions: a value both stored and reduced (Prodigy's new s, ALR-SMAG's new d)
            # is computed once, stored and reduced in the same loop, instead of reduced in a loop of its own that
            # reads its inputs a second time (Prodigy's moments: 6 loads in one loop against 4 + 4 in two).
            patches["config_patches"]["realize_reads_threshold"] = 1
        try:
            kernel = standalone(graph, example, dynamic_shapes="from_graph", options=patches)
        except Exception:
            if not _probe_cpu_isa():
                raise
            kernel = standalone(graph, example, dynamic_shapes="from_graph", options=patches)
        _flat_kernels_compiled += 1
        shaped = probe and not options["stochastic"] and _reads_sizes_from_params(kernel, example, count)
        graph = _compiled_graph(kernel)
        # A kernel that draws random numbers (stochastic rounding) gives two runs different bits: it keeps its
        # wrappers rather than have its check reseed the process's generator (which a background compile would
        # do under the feet of the training thread).
        direct = None if options["stochastic"] else _direct_call(kernel, graph, example)
        # The graph's input positions are the call's arguments' where its direct call matched the wrapped one.
        written = getattr(graph, "mutated_input_idxs", None) if direct is not None else None
        return _FlatKernel(kernel, shaped, tuple(output_names), direct,
                           None if written is None else tuple(sorted(written)))
    return kernel


def _check_size_generic(graph: torch.fx.GraphModule, example: list[Tensor]) -> None:
    """Refuse a traced update that depends on its stand-ins' sizes: the compiled kernel checks no guards, so a
    branch on a size (or a size turned into a constant) would silently compute wrong numbers for other sizes.

    Param-sized stand-ins (2**18 elements and more) must keep symbolic sizes, and tracing must have recorded no
    guard on any size.
    """
    values = [n.meta["val"] for n in graph.graph.nodes if n.op == "placeholder"]
    envs = {d.node.shape_env for v in values for d in v.shape if isinstance(d, torch.SymInt)}
    for v, t in zip(values, example):
        if t.numel() >= 1 << 18 and not all(isinstance(d, torch.SymInt) for d in v.shape):
            raise RuntimeError(f"the update specialised on a tensor size ({tuple(v.shape)}): it cannot serve every "
                               f"shape")
    for env in envs:
        if env.guards:
            raise RuntimeError(f"the update branches on tensor sizes ({env.format_guards().strip()}): it cannot "
                               f"serve every shape")


class _FlatKernel(NamedTuple):
    """A compiled flat-path update, whether its gradients may keep their own (contiguous) shape, and the names of
    the per-slot outputs it returns last (a global-step pass's reductions), one per slot each."""

    run: Callable[..., Any]
    shaped_grads: bool
    outputs: tuple[str, ...] = ()
    direct: Callable[..., Any] | None = None
    written: tuple[int, ...] | None = None


def _compiled_graph(artifact: Callable) -> Any:
    """The inductor graph (``CompiledFxGraph``) inside a standalone-compiled artifact, or None: found by
    following the wrappers' closures and ``compiled_fn`` attributes (a short, bounded search)."""
    todo, seen = [(artifact, 0)], set()
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen or depth > 8:
            continue
        seen.add(id(obj))
        if type(obj).__name__ == "CompiledFxGraph":
            return obj
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                todo.append((cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                continue
        if not isinstance(obj, types.FunctionType):
            for attr in ("_compiled_fn", "compiled_fn"):
                inner = getattr(obj, attr, None)
                if callable(inner):
                    todo.append((inner, depth + 1))
    return None


def _direct_call(artifact: Callable, graph: Any, example: list[Tensor]) -> Callable[..., Any] | None:
    """The artifact's generated code called without the compile stack's runtime wrappers, or None.

    Those wrappers (dynamo's disable context, AOT autograd's runtime wrapper, the output code's input checks)
    cost ~5 us a call, ~10-16 us once a step's streaming has pushed them out of the CPU's caches: at two
    tensors per call a tenth of a two-pass step over 40 tensors. For this engine's graphs (no autograd, no
    aliased inputs or outputs, contiguous tensors it builds itself) what they do reduces to bumping the version
    counters of the inputs the kernel writes: the engine bumps those of the params and states they alias
    itself, after either call. The caller uses the wrapped call where the wrappers do more (under autocast,
    inside a dynamo frame).

    Taken only if the direct call matches the wrapped one bit for bit (every input it writes and every output)
    on random inputs shaped as the example: any other layout of the wrappers' internals (another torch
    version) falls back to the wrapped call. The kernel must not draw random numbers (the two runs would
    differ).
    """
    call = getattr(graph, "current_callable", None)
    if graph is None or not callable(call) or not getattr(graph, "_boxed_call", False) or graph.inputs_to_check:
        return None

    def direct(*args: Tensor) -> Any:
        return call(list(args))

    def run(fn: Callable, inputs: list[Tensor]) -> list[Tensor]:
        args = [t.clone() for t in inputs]
        return [*args, *(fn(*args) or ())]

    try:
        # Values from a private generator: the process's random-number stream stays as it was.
        values = torch.Generator().manual_seed(0)
        inputs = [torch.rand(t.shape, generator=values, dtype=t.dtype).add_(0.5).to(t.device)
                  if t.is_floating_point() else t.clone() for t in example]
        wrapped, mine = run(artifact, inputs), run(direct, inputs)
    except Exception:  # noqa: BLE001 - no direct call where it cannot run like the wrapped one
        return None
    same = len(wrapped) == len(mine) and all(
        a.shape == b.shape and a.dtype == b.dtype
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        for a, b in zip(wrapped, mine))
    return direct if same else None


def _written_tensors(chunk: _FlatChunk, grads: list[Tensor], written: tuple[int, ...] | None) -> list[Tensor]:
    """The params and states (and gradients, were a kernel to write one) that a kernel call writing the
    arguments at positions ``written`` changes through their aliases; ``written`` None (not known): every param
    and state of the chunk. Cached on the chunk, gradients aside (the step supplies them)."""
    cached = chunk.written_cache.get(written)
    if cached is None:
        homes, slots = chunk.homes, len(chunk.params)
        if written is None:
            cached = ([t for t in homes if t is not None], ())
        else:
            cached = ([homes[w] for w in written if w < len(homes) and homes[w] is not None],
                      tuple(w - slots for w in written if slots <= w < slots + len(chunk.idx)))
        chunk.written_cache[written] = cached
    tensors, grad_slots = cached
    return [*tensors, *(grads[chunk.idx[j]] for j in grad_slots)] if grad_slots else tensors


def _direct_calls_allowed() -> bool:
    """Whether a kernel may skip its wrappers now: not under autocast (the runtime wrapper would turn it off
    for the kernel's aten calls) and not inside a dynamo frame (whose callback would try to trace the generated
    code's Python; the wrapped call disables it)."""
    callback = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", None)
    return callback is not None and callback() is None and not torch._C._is_any_autocast_enabled()


def _reads_sizes_from_params(kernel: Callable, example: list[Tensor], count: int) -> bool:
    """Whether the kernel takes each slot's size from its param and only the data of its grad.

    Then gradients go in as they are, contiguous of any shape, instead of as flat views (a view costs ~1-2 us
    of the step per tensor). Checked here by running the kernel on small inputs twice, with flat and with
    2-D gradients: a kernel that read a grad's size would update (or reduce over) fewer elements in the second
    run.
    """
    def small(t: Tensor, size: int) -> Tensor:
        n = 6 if t.numel() == size else t.numel()
        values = torch.linspace(0.5, 1.0, n, dtype=torch.float64).to(t.dtype)
        return values.to(t.device)

    sizes = [t.numel() for t in example[:count]] * 2
    runs = []
    for shaped in (False, True):
        args = [small(t, sizes[i]) if i < 2 * count else t.clone() if t.dim() == 0 else small(t, sizes[i % count])
                for i, t in enumerate(example)]
        if shaped:
            args[count:2 * count] = [g.view(2, 3) if g.numel() == 6 else g for g in args[count:2 * count]]
        outputs = kernel(*args) or ()
        runs.append([a.reshape(-1) for i, a in enumerate(args) if not count <= i < 2 * count]
                    + [o.reshape(-1) for o in outputs])
    return all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(*runs))


def _fresh_code_copy(fn: Callable, tag: str) -> Callable:
    """A copy of fn with its own code object, so that torch.compile keeps a separate cache for it.

    Dynamo keys its cache (and its recompile limit) on the code object; one copy per kernel signature
    keeps optimizers and dtypes from evicting each other's compiled kernels.
    """
    global _compile_counter
    _compile_counter += 1
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}_{_compile_counter}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class Optimizer(torch.optim.Optimizer):
    """Base class of steepest's optimizers: a drop-in :class:`torch.optim.Optimizer`.

    Args (shared by every subclass, keyword-only):
        compile: ``"auto"`` (default) fuses with ``torch.compile`` when the step's params (all groups) hold
            at least 2**20 elements and runs the eager for-each path otherwise; ``True`` always fuses,
            ``False`` never does. ``"background"`` fuses as ``True`` but compiles each kernel in a
            background thread (on stand-in tensors) while the steps run eager, switching once it is
            ready: no compile stall (seconds, 4-5 s on a fresh 2-core machine), at the price of eager-speed
            first steps and a switch point that depends on timing (eager and fused agree to rounding,
            not bit for bit). Tracing is not thread-safe in torch: a ``torch.compile`` of the model that
            traces while the thread does can fail (this optimizer then warns and stays eager).
            :meth:`wait_compiled` blocks until pending kernels are ready. A compiler failure falls
            back to eager with a warning.
        skip_nonfinite: if True, a step whose gradients contain NaN or Inf changes nothing (no
            parameter, no state, no step count) and is counted in ``skipped_steps``. Off by
            default: it costs one device-to-host synchronisation per step.
        state_dtype: dtype of floating-point state buffers. ``None`` (default) keeps float32 states
            for 16-bit params and the param's dtype otherwise; ``torch.bfloat16`` halves state memory
            (``torch.float16`` is refused: squared gradients underflow in its range).
        stochastic_rounding: round writes of float32 working values into bfloat16 storage (states
            and params) stochastically. Defaults to True when ``state_dtype`` is bfloat16, and for methods that
            say so (Prodigy, DoG, LDoG: with bfloat16 params).
    """

    hyperparams: ClassVar[Mapping[str, checks.Check]] = {}
    # How the base applies group["weight_decay"]: "decoupled" (p *= 1 - lr*wd before the update, as
    # AdamW), "l2" (g += wd*p, as Adam), or "custom" (the update function handles it).
    weight_decay_mode: ClassVar[str] = "decoupled"
    # Group options added to a method after its state_dicts were first written, with the value that reproduces the
    # older behaviour: a state_dict without them still loads.
    later_defaults: ClassVar[Mapping[str, Any]] = {}
    # The update reads and writes each element independently, so tensors may be flattened.
    elementwise: ClassVar[bool] = True
    # Not elementwise, but its only operations across elements are reductions over a whole tensor (norms,
    # dot products, max): a flattened tensor gives the same numbers, so the fused path may flatten too.
    whole_tensor_reductions: ClassVar[bool] = False
    # Not elementwise, but its only operations across elements are reductions over the rows of
    # p.reshape(p.shape[0], -1) and over the whole tensor, and 0/1-dim params are updated elementwise: the fused
    # path may view a param of 2+ dims as that matrix (one graph for every shape) and flatten the others.
    matrix_view: ClassVar[bool] = False
    # The update couples no two tensors, so the fused path may compile one tensor at a time.
    per_tensor: ClassVar[bool] = True
    # The step count only tells the first step from the others, so a state_dict of an optimizer that counts no
    # steps per param (torch.optim.SGD; D-Adaptation SGD's package, which counts k in its groups) loads, as a state
    # that has stepped (k times where the group says so).
    loads_stepless_state: ClassVar[bool] = False
    # False for methods whose step is not a good compile target (matrix decompositions, host-side reductions):
    # they always run the eager path, whatever ``compile`` says. So do updates that neither flatten nor take
    # matrix views: the fused path compiles one kernel for every shape, which needs one of those layouts.
    fusable: ClassVar[bool] = True
    # States kept at the param's working precision whatever state_dtype says: initial points (copy_state) and values
    # differenced against new ones (Adan's previous gradient).
    exact_states: ClassVar[tuple[str, ...]] = ()
    # States (by key prefix) kept at the param's working precision whatever state_dtype says: matrices whose
    # rounding a later inverse or root would magnify (Shampoo's factors and roots).
    precise_state_prefixes: ClassVar[tuple[str, ...]] = ()
    needs_closure: ClassVar[bool] = False
    # Inductor options for this method's compiled kernels (``torch._inductor.config`` names), where its defaults
    # schedule the update's loops badly; ``inductor_config_large`` for a layout whose elements are mostly in tensors
    # of _LARGE_KERNEL_NUMEL elements or more, whose loops' data does not stay in the last-level cache.
    inductor_config: ClassVar[Mapping[str, Any]] = {}
    inductor_config_large: ClassVar[Mapping[str, Any]] = {}
    # States a group uses only under some of its hyperparameters (SGD's momentum buffer while momentum != 0), each
    # with the test on the group. When a hyperparameter changes between steps (a momentum schedule starting at 0),
    # the state is created at the param's next step, as torch.optim.SGD creates its buffer; one kept while unused
    # is left as it is and not passed to the update (torch.optim.SGD's buffer waits the same way). A state_dict with
    # or without them loads. Such states are shaped like their param.
    optional_states: ClassVar[Mapping[str, Callable[[Mapping[str, Any]], bool]]] = {}
    # States the authors' package keeps flattened: a state_dict of theirs holds them as 1-D tensors of the param's
    # size, loaded in the param's shape.
    flat_states: ClassVar[tuple[str, ...]] = ()
    # Group options a state_dict of the authors' package lacks, which no longer matter once it has stepped (its
    # initial estimate d0): taken from this optimizer's group on load.
    package_group_gaps: ClassVar[tuple[str, ...]] = ()
    # Names the authors' package gives states (SGDP's "momentum" buffer) or group options (QHAdam's
    # "decouple_weight_decay") that this implementation names otherwise: renamed on load.
    package_state_names: ClassVar[Mapping[str, str]] = {}
    package_group_names: ClassVar[Mapping[str, str]] = {}
    # States the authors' package keeps and this implementation recomputes (D-Adaptation SGD's z = x0 - s): dropped
    # from a state_dict on load.
    package_only_states: ClassVar[tuple[str, ...]] = ()
    # Writes into bfloat16 storage (bfloat16 params included) round stochastically unless stochastic_rounding=False:
    # for methods whose step size is estimated from how far the params moved, which rounded to nearest never move.
    stochastic_rounding_default: ClassVar[bool] = False
    update: ClassVar[Callable[..., None]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _own_step(cls.__dict__["step"])

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, compile: bool | str = "auto",
                 skip_nonfinite: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool | None = None, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        name = type(self).__name__
        if compile not in ("auto", True, False, "background"):
            raise ValueError(f"{name}: compile must be 'auto', True, False or 'background', got {compile!r}")
        _refuse_torch_options(name, foreach=foreach, fused=fused, capturable=capturable,
                              differentiable=differentiable)
        checks.boolean("skip_nonfinite", skip_nonfinite)
        if state_dtype == torch.float16:
            # Squares of gradients below ~2.4e-4 are 0 in float16: Adam's v underflows and its steps become
            # lr m / eps (AdamW, gradients of 1e-4: |p| 18x the float32 run's after 20 steps).
            raise ValueError(f"{name}: state_dtype=torch.float16 is not supported: its range ends at 6e-8, so "
                             f"squared gradients below ~2.4e-4 round to 0 and second-moment steps blow up to "
                             f"lr m / eps; use torch.bfloat16 (float32's range in half the memory)")
        if state_dtype is not None and state_dtype not in (torch.float32, torch.float64, torch.bfloat16):
            raise ValueError(f"{name}: state_dtype must be None, torch.float32, torch.float64 or "
                             f"torch.bfloat16, got {state_dtype!r}")
        if stochastic_rounding is None:
            stochastic_rounding = state_dtype == torch.bfloat16 or self.stochastic_rounding_default
        checks.boolean("stochastic_rounding", stochastic_rounding)
        defaults = dict(defaults)
        defaults.setdefault("maximize", False)
        self._check_hyperparams(defaults, where="")
        self.compile = compile
        self.skip_nonfinite = skip_nonfinite
        self.state_dtype = state_dtype
        self.stochastic_rounding = stochastic_rounding
        self.skipped_steps = 0
        self._reset_caches()
        super().__init__(params, defaults)
        if stochastic_rounding and any(p.dtype == torch.float16 for g in self.param_groups for p in g["params"]):
            why = (" this method's first steps (~1e-6) fall below half a float16 spacing, and its step size, estimated "
                   "from how far the params moved, can stall;" if self.stochastic_rounding_default else "")
            warnings.warn(f"{name}: float16 params are written rounded to nearest (stochastic rounding is to "
                          f"bfloat16 only):{why} keep float32 params (autocast the forward) or use bfloat16 ones",
                          UserWarning, stacklevel=2)

    # Caches rebuilt on demand, never copied or pickled (compiled kernels, tensor aliases, generators).
    _transient: ClassVar[tuple[str, ...]] = ("_kernels", "_scratch_cache", "_plans",
                                                 "_compile_jobs", "_scalar_slots", "_param_shaped")
    # torch.optim.Optimizer's hook registries: a copy starts without hooks, as torch's optimizers do.
    _hook_attrs: ClassVar[tuple[str, ...]] = (
        "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks")

    def _reset_caches(self) -> None:
        self._kernels: dict[tuple, Callable | None] = {}
        self._scratch_cache: dict[tuple, dict[str, list[Tensor]]] = {}
        self._plans: dict[tuple, _FusedPlan] = {}
        self._compile_jobs: dict[tuple, _CompileJob] = {}
        self._scalar_slots: dict[int, tuple[Any, tuple[Tensor, ...]]] = {}
        self._param_shaped: dict[int, tuple[str, ...]] = {}
        # Elements of the params this step updates, in all groups: what compile="auto" decides on.
        self._step_numel = 0

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups: a deep copy would lose the engine
        # settings (compile, skip_nonfinite, state_dtype, ...) and every subclass's own attributes.
        skip = set(self._transient) | set(self._hook_attrs)
        for cls in type(self).__mro__:
            skip.update(getattr(cls, "_transient", ()))
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_caches()

    # ----------------------------------------------------------------------------------- validation
    @classmethod
    def takes_dtensor_params(cls) -> bool:
        """Whether params that are tensor subclasses with their own ops (DTensor: FSDP2, tensor parallelism) step
        as whole tensors would: elementwise updates (no reduction, no matrix product), without Hessian products."""
        return cls.elementwise and not getattr(cls, "needs_graph", False)

    def weight_decay_mode_of(self, group: Mapping[str, Any]) -> str:
        """How ``group``'s weight decay is applied: the class's ``weight_decay_mode`` unless a method lets the group
        choose."""
        return self.weight_decay_mode

    def _check_hyperparams(self, group: Mapping[str, Any], where: str) -> None:
        name = type(self).__name__
        for key, check in self.hyperparams.items():
            if key not in group:
                raise ValueError(f"{name}: hyperparameter {key!r} is missing{where}")
            try:
                check(key, group[key])
            except (TypeError, ValueError) as err:
                raise type(err)(f"{name}{where}: {err}") from None
        checks.boolean("maximize", group.get("maximize", False))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after checking its options; nothing is added if one is invalid."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        engine = self.engine_options()
        given = {k: param_group[k] for k in engine if k in param_group}
        for key, value in given.items():
            if value is not engine[key] and value != engine[key]:
                raise ValueError(f"{type(self).__name__}: {key} is an option of the optimizer, not of a param group: "
                                 f"this one has {key}={engine[key]!r}, the group asks for {value!r}")
        if given:
            # Wrappers that pass their keyword arguments into every group (ZeroRedundancyOptimizer) repeat the
            # optimizer's own options there.
            param_group = {k: v for k, v in param_group.items() if k not in given}
        unknown = set(param_group) - set(self.defaults) - _STANDARD_GROUP_KEYS
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)} in a param group; "
                             f"accepted: {sorted(self.defaults)}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_hyperparams(merged, where=f" (param group {len(self.param_groups)})")
        params = param_group["params"]
        plist = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(plist):
            if isinstance(p, Tensor) and p.is_sparse:
                raise ValueError(f"{type(self).__name__}: parameter {i} is a sparse tensor; dense parameters only")
        super().add_param_group(param_group)

    def engine_options(self) -> dict[str, Any]:
        """The options that hold for the whole optimizer (how it runs, not what it computes), with their values,
        torch.optim's implementation switches at the only values accepted here included."""
        return {"compile": self.compile, "skip_nonfinite": self.skip_nonfinite, "state_dtype": self.state_dtype,
                "stochastic_rounding": self.stochastic_rounding, "foreach": None, "fused": None, "capturable": False,
                "differentiable": False}

    # ------------------------------------------------------------------------ what subclasses give
    def init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Fresh per-parameter state buffers (no 'step': the base keeps it)."""
        return {}

    def scalars(self, group: dict[str, Any], step: int) -> dict[str, float]:
        """Per-step numbers for the update, in double precision."""
        return {"lr": self.lr(group)}

    def static_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """Options that select a code path; part of the compiled kernel's signature."""
        return {}

    # ------------------------------------------------------------------------------------- helpers
    @staticmethod
    def lr(group: Mapping[str, Any]) -> float:
        """The group's learning rate as a Python float (a tensor lr is read once per step)."""
        lr = group["lr"]
        return float(lr) if isinstance(lr, Tensor) else lr

    def zeros_state(self, p: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A zero buffer shaped like p in the state dtype (or ``dtype``)."""
        return torch.zeros_like(p, dtype=dtype or self.state_dtype_for(p), memory_format=torch.preserve_format)

    def copy_state(self, p: Tensor) -> Tensor:
        """A copy of p at its working precision, whatever ``state_dtype`` says: an initial point kept for distances
        (DoG's x0, Prodigy's p0). A bfloat16 copy would put its rounding error, ~2**-9 of ||p||, into every
        distance from it: DoG's first distance ||x_1 - x_0|| would be ~1000x its reps_rel start."""
        dtype = working_dtype(p.dtype) if p.is_floating_point() else p.dtype
        return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(p)

    def precise_dtype_for(self, p: Tensor) -> torch.dtype:
        """The dtype of p's states that a 16-bit ``state_dtype`` would spoil (differenced against new values, or
        inverted): the state dtype, raised to p's working precision where it is 16-bit."""
        return working_dtype(self.state_dtype_for(p))

    def state_dtype_for(self, p: Tensor) -> torch.dtype:
        """The dtype state buffers of parameter p are stored in."""
        if p.is_complex() or not p.is_floating_point():
            return p.dtype
        if self.state_dtype is not None:
            return self.state_dtype
        return working_dtype(p.dtype)

    # ----------------------------------------------------------------------------------------- step
    @_own_step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        if closure is None and self.needs_closure:
            raise ValueError(f"{type(self).__name__}.step needs a closure that re-evaluates the loss "
                             f"(step(closure)); see its docstring")
        loss = None if closure is None else self.call_closure(closure)
        return self._step_on_grads(loss)

    def call_closure(self, closure: Callable[[], Any]) -> Any:
        """``closure()`` with gradients enabled and under the autocast regions ``step`` was called in (the update
        itself runs outside them)."""
        with torch.enable_grad(), autocast_on(getattr(self, "_caller_autocast", None) or []):
            return closure()

    def _step_on_grads(self, loss: Any) -> Any:
        """The step on the gradients the params hold now (a closure, if any, has run); returns ``loss``. Nothing
        changes when a check fails or, with ``skip_nonfinite``, when a gradient is not finite (counted)."""
        work = self._collect()
        if not work:
            return loss
        if self.skip_nonfinite and not self._grads_finite(work):
            self.skipped_steps += 1
            return loss
        for group, params in work:
            self._step_group(group, params)
        return loss

    def _collect(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Params with gradients, per group; every check that can fail runs here, before any change."""
        work = []
        subclasses_ok = self.takes_dtensor_params()
        numel = 0
        state_of = self.state.get
        for gi, group in enumerate(self.param_groups):
            params = []
            shaped = self._param_shaped_states(group)
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if not subclasses_ok and not mt.plain(p):
                    # A DTensor's reduction is a partial sum whose .item() is this process's share, and its matrix
                    # products follow placement rules, not this method's: in a two-process test TAM and NovoGrad
                    # took other steps than on the whole tensors, and K-FAC, Shampoo, SOAP and the Hessian methods
                    # failed mid-step.
                    raise TypeError(f"{type(self).__name__}: param {pi} of group {gi} is a {type(p).__name__} (a "
                                    f"tensor subclass with its own ops, such as the DTensor params of FSDP2 or tensor "
                                    f"parallelism); this method reduces over whole tensors or the model or multiplies "
                                    f"matrices, which such params would not compute as one tensor: pass plain tensors, "
                                    f"or use an elementwise method (AdamW, Lion, Adan, SGD, ...)")
                if not subclasses_ok and getattr(p, "_fsdp_flattened", False):
                    raise TypeError(f"{type(self).__name__}: param {pi} of group {gi} is a FullyShardedDataParallel "
                                    f"parameter (a shard of flattened tensors); this method's per-tensor or matrix "
                                    f"statistics would span pieces of several of the model's tensors: use an "
                                    f"elementwise method (AdamW, Lion, ...) or a global-step one (DoG, Prodigy, "
                                    f"D-Adaptation) with FSDP")
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (param {pi} "
                                       f"of group {gi}); use torch.optim.SparseAdam or densify the gradient")
                if g.shape != p.shape:
                    raise RuntimeError(f"param {pi} of group {gi} has shape {tuple(p.shape)} but its grad has "
                                       f"shape {tuple(g.shape)}")
                st = state_of(p)
                if st and (resized := _resized_state(p, st, shaped)):
                    self._refuse_state_shape(p, resized, st[resized], gi, pi)
                params.append(p)
                numel += p.numel()
            if params:
                work.append((group, params))
        self._step_numel = numel
        return work

    def _param_shaped_states(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state names the method makes shaped like their param, for a matrix and for a vector in this group
        (the required ones first; found once per group); a param's first one present is compared with the param's
        shape at each step."""
        names = self._param_shaped.get(id(group))
        if names is None:
            found: list[str] = []
            for shape in ((3, 2), (3,)):
                template = self.init_state(torch.empty(shape, device="meta"), group)
                found += [k for k, t in template.items()
                          if isinstance(t, Tensor) and t.shape == shape and k not in found]
            names = self._param_shaped[id(group)] = tuple(sorted(found, key=lambda k: k in self.optional_states))
        return names

    def check_state_shapes(self) -> None:
        """Refuse (ValueError) any param whose state was made for another shape, gradient or not: for steps that
        read the state before the gradients (XGrad's weight prediction)."""
        for gi, group in enumerate(self.param_groups):
            shaped = self._param_shaped_states(group)
            for pi, p in enumerate(group["params"]):
                st = self.state.get(p)
                if st and (resized := _resized_state(p, st, shaped)):
                    self._refuse_state_shape(p, resized, st[resized], gi, pi)

    def from_package_state(self, state: dict[str, Any], group: Mapping[str, Any]) -> dict[str, Any]:
        """A param's state from a state_dict of the authors' package, as this optimizer keeps it (``load_state_dict``
        calls it; by default the state as it is)."""
        return state

    def _refuse_state_shape(self, p: Tensor, name: str, v: Tensor, gi: int, pi: int) -> None:
        """A param whose shape changed since its state was made (``p.data`` replaced by a resized tensor, as when an
        embedding grows) is refused: eager, the step failed midway with a broadcast error after updating the params
        before it; fused, the kernel read the old states past their end."""
        raise ValueError(f"{type(self).__name__}: param {pi} of group {gi} has shape {tuple(p.shape)} but its state "
                         f"{name!r} was made for shape {tuple(v.shape)} (the param's data was replaced by a resized "
                         f"tensor); build a new optimizer for the new shapes, or drop this param's state "
                         f"(del opt.state[p]) to restart it")

    @staticmethod
    def _grads_finite(work: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        shards: list[Tensor] = []
        for _, params in work:
            for p in params:
                g = p.grad
                if mt.plain(g) or not hasattr(g, "to_local"):
                    by_device[g.device].append(as_real(g))
                else:
                    shards.append(g.to_local())
        for grads in by_device.values():
            grads = [g for g in grads if g.numel() > 0]
            if grads:
                peaks = torch._foreach_norm(grads, ord=math.inf)
                if not bool(torch.stack([x.float() for x in peaks]).isfinite().all()):
                    return False
        if shards:
            # DTensor gradients: every process decides on the whole tensors (one that skipped while the others
            # stepped would leave the shards out of step). Their local shards may be empty (uneven sharding).
            import torch.distributed as dist

            bad = torch.tensor([0.0 if all(bool(x.isfinite().all()) for x in shards) else 1.0],
                               device=shards[0].device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            return bool(bad.item() == 0.0)
        return True

    def _state_of(self, p: Tensor, group: dict[str, Any], in_use: list[str] | None = None) -> dict[str, Any]:
        """p's state, initialised (``init_state``, step 0) on first use, with the optional states its group uses
        now (``in_use``: those of :meth:`optional_in_use`, if the caller has them) added where missing."""
        state = self.state[p]
        if not state:
            state.update(self.init_state(p, group))
            state["step"] = 0
        elif self.optional_states:
            missing = [k for k in (self.optional_in_use(group) if in_use is None else in_use) if k not in state]
            if missing:
                fresh = self.init_state(p, group)
                state.update({k: fresh[k] for k in missing})
                self.optional_states_added(state, missing)
        return state

    def optional_in_use(self, group: Mapping[str, Any]) -> list[str]:
        """The ``optional_states`` the group uses at its current hyperparameters."""
        return [k for k, used in self.optional_states.items() if used(group)]

    def optional_states_added(self, state: dict[str, Any], keys: list[str]) -> None:
        """Called when a param's state gains ``optional_states`` (its group's hyperparameters changed)."""

    def state_names(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> list[str]:
        """The keys of a param's state its update takes now: all but 'step' and the optional states the group
        does not use at its current hyperparameters."""
        optional = self.optional_states
        return [k for k in state if k != "step" and (k not in optional or optional[k](group))]

    def _counted_by_kind(self, group: dict[str, Any], params: list[Tensor],
                         is_matrix: Callable[[Tensor], bool]) -> list[tuple[bool, int, list[Tensor]]]:
        """For optimizers with a matrix update and an elementwise fallback (Muon, SCALE): each param's step
        counted, then (is_matrix, step, params) buckets by kind, device and dtypes; fallback buckets also by step
        (their bias corrections read it), matrix buckets with step 0."""
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            state = self._state_of(p, group)
            state["step"] += 1
            matrix = is_matrix(p)
            buckets[(matrix, p.device, p.dtype, p.grad.dtype, 0 if matrix else state["step"])].append(p)
        return [(matrix, step, bucket) for (matrix, _, _, _, step), bucket in buckets.items()]

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        buckets: dict[tuple, tuple[list[Tensor], list[dict[str, Any]]]] = {}
        in_use = self.optional_in_use(group)
        for p in params:
            state = self._state_of(p, group, in_use)
            step = state["step"] = state["step"] + 1
            key = (p.device, p.dtype, p.grad.dtype, step)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = ([], [])
            bucket[0].append(p)
            bucket[1].append(state)
        for (device, _, _, step), (bucket, bucket_states) in buckets.items():
            self._run_bucket(group, bucket, step, device, bucket_states)

    def _run_bucket(self, group: dict[str, Any], params: list[Tensor], step: int, device: torch.device,
                    param_states: list[dict[str, Any]]) -> None:
        names = self.state_names(param_states[0], group)
        grads = [p.grad for p in params]
        states = {k: [st[k] for st in param_states] for k in names}
        if params[0].is_complex():
            params = [torch.view_as_real(p) for p in params]
            grads = [torch.view_as_real(g) for g in grads]
            states = {k: [as_real(s) for s in v] for k, v in states.items()}
        scalars = self.scalars(group, step)
        wd_mode, wd = None, 0.0
        weight_decay = group.get("weight_decay", 0.0)
        if weight_decay != 0 and (mode := self.weight_decay_mode_of(group)) != "custom":
            wd_mode = mode
            wd = 1.0 - self.lr(group) * weight_decay if wd_mode == "decoupled" else float(weight_decay)
        options = dict(static=self.static_options(group), maximize=bool(group["maximize"]), wd_mode=wd_mode,
                       stochastic=self.rounds_stochastically(params, states))

        todo = list(range(len(params)))
        if self._wants_compile(params):
            plan = self._fused_plan(group, params, grads, states)
            fused = plan.order
            if fused:
                done = set(self._run_fused(params, grads, states, scalars, wd, plan, device, options))
                todo = [i for i in todo if i not in done]
        for chunk in self._eager_chunks(params, todo):
            chunk_params, chunk_grads = [params[i] for i in chunk], [grads[i] for i in chunk]
            chunk_states = {k: [v[i] for i in chunk] for k, v in states.items()}
            for piece in self._eager_pieces(chunk_params, chunk_grads, chunk_states):
                _apply_update(type(self).update, *piece, scalars, wd, **options)

    def _eager_pieces(self, params: list[Tensor], grads: list[Tensor], states: dict[str, list[Tensor]]) -> list[tuple]:
        """An eager chunk as the (params, grads, states) of one update call, or, for one large tensor of an
        elementwise update, flat slices of _EAGER_CHUNK_NUMEL elements (the last one shorter), so that the update's
        temporaries (and float32 copies of 16-bit params, grads or states) are as small as other chunks' are.

        Temporaries of several MB are returned to the OS after each use and page-faulted back on the next (glibc's
        allocator trims them). Measured, each in a process of its own or A/B in one: AdamW on 16.8M bfloat16
        params in 40 tensors, 80 ms a step whole, 22 ms in pieces; float32 AdamW on one 38.6M embedding, 124 ms
        whole, 57 ms in pieces (Adan 326 and 84). For float32 tensors under ~2M elements the extra calls cost
        more than they save (420k elements: pieces/whole 1.05-1.14), so they stay whole."""
        pieces = flat_pieces(params, grads, states) if self.elementwise else None
        return [(params, grads, states)] if pieces is None else pieces

    def _eager_chunks(self, params: list[Tensor], idx: list[int]) -> list[list[int]]:
        """Split an eager bucket into runs of about _EAGER_CHUNK_NUMEL elements.

        The update's temporaries (a square root, a direction) are then a few MB that the C allocator
        reuses from chunk to chunk; one set of temporaries as large as the whole model is returned to the
        OS after each step and page-faulted back in on the next, which can double the step time.
        """
        if not idx:
            return []
        if not self.per_tensor:
            return [idx]
        return [[idx[j] for j in run] for run in chunk_runs([params[i].numel() for i in idx])]

    # --------------------------------------------------------------------------------- fused path
    def rounds_stochastically(self, params: list[Tensor], states: dict[str, list[Tensor]]) -> bool:
        """Whether a bucket's write-back rounds stochastically: ``stochastic_rounding`` on and a bfloat16 param or
        state to write (a bucket holds one param dtype, and each state one dtype). Other dtypes are written as they
        are, so their kernels are the plain ones: a kernel keyed as stochastic keeps its wrappers (~10 us a call)
        and flat views of the gradients (Prodigy, DoG and LDoG, on by default, paid both with float32 params)."""
        return self.stochastic_rounding and any(
            t[0].dtype == torch.bfloat16 for t in (params, *states.values()) if len(t))

    def _wants_compile(self, params: list[Tensor]) -> bool:
        # Traced by a caller's torch.compile (the step itself is kept out of it; this guards code that calls the
        # update functions from a traced function), the update stays plain ops of their graph.
        if self.compile is False or not self.fusable or not self._flattenable() or torch.compiler.is_compiling():
            return False
        if self.compile in (True, "background"):
            return True
        # The model's size decides, not the bucket's: with one param group per layer (layer-wise learning rates)
        # every group may be small while the kernels, shared by the groups, pay off (50 groups of 200k float32
        # params: eager 13.5 ms a step, fused 6.0 ms).
        return max(self._step_numel, sum(p.numel() for p in params)) >= _COMPILE_MIN_NUMEL

    def _fused_plan(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    states: dict[str, list[Tensor]], elementwise: bool | None = None) -> _FusedPlan:
        """Which tensors of a bucket the compiled kernel takes, in which order, with flat aliases of the
        params and states, reused from step to step while every param and state keeps its memory.

        An alias holds its storage, so memory seen here cannot be freed and reused by another tensor while
        the plan lives: equal addresses mean the same tensors. Gradients are viewed flat afresh at each step
        (they are often new tensors, and holding them would keep a model's worth of dead gradients alive).
        """
        elementwise = self.elementwise if elementwise is None else elementwise
        sig = tuple(p.data_ptr() for p in params) + tuple(t.data_ptr() for v in states.values() for t in v)
        key = (id(group), params[0].device, params[0].dtype, grads[0].dtype, len(params), elementwise, tuple(states))
        plan = self._plans.get(key)
        if (plan is not None and plan.sig == sig and all(grads[i].is_contiguous() for i in plan.contiguous)
                and all(grads[i].stride() == params[i].stride() for i in plan.strided)):
            return plan
        if self._match_state_orders(params, grads, states):
            sig = tuple(p.data_ptr() for p in params) + tuple(t.data_ptr() for v in states.values() for t in v)
        order = [i for i in range(len(params)) if self._fusable(params[i], grads[i], states, i)]
        chunks = self._flat_chunks(params, grads, states, order, elementwise) if order else []
        strided = [i for i in order if not params[i].is_contiguous()]
        plan = _FusedPlan(sig, order, chunks, [i for i in order if params[i].is_contiguous()], strided)
        self._plans[key] = plan
        return plan

    def _match_state_orders(self, params: list[Tensor], grads: list[Tensor], states: dict[str, list[Tensor]]) -> bool:
        """Give a param's param-sized states its memory order where they lost it (the model moved to or from
        channels_last after its states were made: ``model.to(memory_format=...)`` replaces each param's data) and its
        gradient has it: the same values in new tensors, in ``self.state`` and in ``states``. Returns whether any
        moved."""
        moved = False
        for i, p in enumerate(params):
            st = self.state.get(p)
            if st is None or not mt.plain(p) or not mt.dense(p) or not mt.same_order(grads[i], p):
                continue
            for k, v in states.items():
                t = v[i]
                if t.shape == p.shape and not mt.same_order(t, p) and st.get(k) is t:
                    v[i] = st[k] = torch.empty_like(p, dtype=t.dtype).copy_(t)
                    moved = True
        return moved

    def _flat_chunks(self, params: list[Tensor], grads: list[Tensor], states: dict[str, list[Tensor]],
                     order: list[int], elementwise: bool) -> list[_FlatChunk]:
        """The flat path's kernel calls over params[order]. Elementwise updates take _FUSE_CHUNK tensors per
        call (fewer calls; the last one padded with scratch tensors). Whole-tensor reductions take one tensor
        per call: the compiled kernel runs all of a call's reductions before its elementwise loops, so one
        tensor at a time re-reads it from cache, not from memory. Matrix views are one tensor per call too."""
        matrices = [i for i in order if self.matrix_view and params[i].dim() > 1]
        flat = [i for i in order if not (self.matrix_view and params[i].dim() > 1)]
        chunks = []
        if flat:
            size = _FUSE_CHUNK if elementwise or self.matrix_view else 1
            first = flat[0]
            scratch = self._scratch(params[first], grads[first], {k: v[first] for k, v in states.items()})
            for start in range(0, len(flat), size):
                idx = flat[start:start + size]
                pad = size - len(idx)
                chunk_states = {k: [_flat_alias(v[i]) for i in idx] + scratch[k][:pad] for k, v in states.items()}
                homes = [*(params[i] for i in idx), *[None] * (pad + size),
                         *(t for v in states.values() for t in [*(v[i] for i in idx), *[None] * pad])]
                chunks.append(_FlatChunk("flat", (-1,), idx,
                                         [_flat_alias(params[i]) for i in idx] + scratch["param"][:pad],
                                         scratch["grad"][:pad], chunk_states,
                                         [t for v in chunk_states.values() for t in v], homes, {},
                                         not all(params[i].is_contiguous() for i in idx)))
        for i in matrices:
            shape = (params[i].shape[0], params[i].numel() // params[i].shape[0])
            chunk_states = {k: [_flat_alias(v[i], shape)] for k, v in states.items()}
            chunks.append(_FlatChunk("matrix", shape, [i], [_flat_alias(params[i], shape)], [], chunk_states,
                                     [t for v in chunk_states.values() for t in v],
                                     [params[i], None, *(v[i] for v in states.values())], {},
                                     not params[i].is_contiguous()))
        return chunks

    @classmethod
    def _flattenable(cls) -> bool:
        return cls.per_tensor and (cls.elementwise or cls.whole_tensor_reductions or cls.matrix_view)

    def _fusable(self, p: Tensor, g: Tensor, states: dict[str, list[Tensor]], i: int) -> bool:
        # Tensor subclasses that dispatch their own ops (DTensor params of FSDP2 / tensor parallelism) have no local
        # memory the flat kernels could alias: they go eager, through their own ops (aliased, the process crashed).
        if not (mt.plain(p) and mt.plain(g)):
            return False
        # 0/1-element tensors would specialise the dynamic-shape kernel: they go eager.
        if p.numel() < 2 or not mt.dense(p) or not mt.same_order(g, p):
            return False
        # A dense param in another order (channels_last) is stepped over its memory as it lies, which an update
        # over elements and whole-tensor sums does not see; a matrix view's rows must be whole spans of it.
        if (self.matrix_view and p.dim() > 1 and not p.is_contiguous()
                and p.stride(0) * p.shape[0] != p.numel()):
            return False
        # torch.compile (2.13) drops in-place writes to 0-dim tensor inputs: such states stay eager. States of
        # another size than p (one number per tensor) are contiguous.
        return all(v[i].dim() > 0 and (mt.same_order(v[i], p) if v[i].numel() == p.numel() else v[i].is_contiguous())
                   for v in states.values())

    @staticmethod
    def _kernel_key(p: Tensor, g: Tensor, states: dict[str, list[Tensor]], options: dict[str, Any],
                    scalar_names: tuple[str, ...]) -> tuple:
        """What a compiled kernel is specialised on: device, dtypes, code-path options and the scalars' names."""
        return (p.device, p.dtype, g.dtype, tuple((k, v[0].dtype) for k, v in states.items()),
                tuple(sorted(options["static"].items())), options["maximize"], options["wd_mode"],
                options["stochastic"], scalar_names)

    def _large_layouts(self, plan: _FusedPlan) -> set[str]:
        """The layouts whose kernel is compiled with ``inductor_config_large``: those where tensors of
        _LARGE_KERNEL_NUMEL elements or more hold most of the plan's elements (one kernel per layout either way: a
        second one would add its compile, ~2 s on a fresh 2-core machine, to the first step)."""
        if not self.inductor_config_large:
            return set()
        total: dict[str, int] = defaultdict(int)
        large: dict[str, int] = defaultdict(int)
        for chunk in plan.chunks:
            for t in chunk.params:
                total[chunk.layout] += t.numel()
                if t.numel() >= _LARGE_KERNEL_NUMEL:
                    large[chunk.layout] += t.numel()
        return {layout for layout, n in large.items() if 2 * n > total[layout]}

    def _flat_kernel(self, key: tuple, options: dict[str, Any], chunk: _FlatChunk, grads: list[Tensor],
                     scalars: dict[str, Tensor], wd: Tensor, update: Callable,
                     large: bool = False) -> _FlatKernel | None:
        """The flat-path kernel of ``update`` for key, compiling it on stand-ins of the chunk's arguments the first
        time; None while it compiles in the background or after the compiler failed: the caller steps eager."""
        if key in self._kernels:
            return self._kernels[key]
        job = self._compile_jobs.get(key)
        if job is None or job.orphaned:
            chunk_grads = [grads[i] for i in chunk.idx] + chunk.grad_pads
            standins = self._standin_args(chunk.params, chunk_grads, chunk.states, scalars, wd, chunk.layout)
            config = {**self.inductor_config, **(self.inductor_config_large if large else {})}
            job = _CompileJob(_compile_flat, (update, standins, options, chunk.layout == "flat", config),
                              wait=self.compile != "background")
            self._compile_jobs[key] = job
        if not job.done.is_set():
            return None
        del self._compile_jobs[key]
        if job.error is not None:
            self._compile_failed(key, job.error)
            return None
        self._kernels[key] = job.result
        return job.result

    def _compile_failed(self, key, err: BaseException) -> None:
        self._kernels[key] = None
        warnings.warn(f"{type(self).__name__}: torch.compile failed ({type(err).__name__}: {err}); "
                      f"running the eager path instead", RuntimeWarning, stacklevel=6)

    def _standin_args(self, params, grads, states, scalars, wd, layout: str = "flat") -> tuple:
        """Arguments shaped as a flat-path call's, on fresh tensors, to compile the kernel on.

        Each slot gets its own size (2**18 + 64 i, or a 1024 + 64 i by 257 + 64 i matrix: large enough that the
        generated loops run in parallel), so no two sizes share a symbol and the kernel serves any sizes and
        storage offsets. States of another size than their param (one number per tensor) keep their size.
        """
        def standin(t: Tensor, slot: int, like: Tensor) -> Tensor:
            if t.numel() != like.numel():
                shape = tuple(t.shape)
            elif layout == "matrix":
                shape = (1024 + 64 * slot, 257 + 64 * slot)
            else:
                shape = ((1 << 18) + 64 * slot,)
            return torch.zeros(shape, dtype=t.dtype, device=t.device)

        sp = [standin(p, i, p) for i, p in enumerate(params)]
        sg = [standin(g, i, p) for i, (g, p) in enumerate(zip(grads, params))]
        ss = {k: [standin(t, i, p) for i, (t, p) in enumerate(zip(v, params))] for k, v in states.items()}
        return sp, sg, ss, {k: v.clone() for k, v in scalars.items()}, wd.clone()

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until the kernels ``compile="background"`` is compiling are ready (or ``timeout`` seconds pass);
        returns True when none is pending. The next step then runs fused. (A job inherited through fork is
        dropped: the child's next step compiles it again.)"""
        for key, job in list(self._compile_jobs.items()):
            if job.orphaned:
                del self._compile_jobs[key]
            elif not job.done.wait(timeout):
                return False
        return True

    def _scalar_tensors(self, values: list[float], device: torch.device) -> tuple[Tensor, ...]:
        """A step's scalars as 0-dim tensors for the compiled kernels.

        On the CPU, one buffer per count is refilled in place through NumPy (~1 us, against ~5-30 us for a new
        tensor): kernels there run synchronously, so none still reads the previous step's values.
        """
        if device.type != "cpu":
            dtype = torch.float32 if device.type == "mps" else torch.float64
            return torch.tensor(values, dtype=dtype, device=device).unbind()
        slots = self._scalar_slots.get(len(values))
        if slots is None:
            buffer = torch.zeros(len(values), dtype=torch.float64)
            slots = self._scalar_slots[len(values)] = (buffer.numpy(), buffer.unbind())
        slots[0][:] = values
        return slots[1]

    def _run_fused(self, params, grads, states, scalars, wd, plan: _FusedPlan, device, options,
                   update: Callable | None = None, outputs: dict[str, dict[int, Tensor]] | None = None,
                   reverse: bool = False) -> list[int]:
        """The compiled update over params[plan.order], one kernel call per chunk, over flat (or matrix) views of
        its tensors: one graph for every shape and storage offset (per shape, each rank and size pattern would
        compile for seconds). Returns the indices it updated; the caller steps the others eager.

        ``update`` defaults to the class's; the per-tensor values it returns (a global-step pass's reductions) go
        into ``outputs[name][index]``."""
        update = type(self).update if update is None else update
        names = list(scalars)
        tail = self._scalar_tensors([float(scalars[k]) for k in names] + [float(wd)], device)
        tscalars, twd = dict(zip(names, tail[:-1])), tail[-1]
        first = plan.order[0]
        key = self._kernel_key(params[first], grads[first], states, options, tuple(names)) + (update,)
        done: list[int] = []
        kernels: dict[tuple[str, bool], _FlatKernel | None] = {}
        direct = _direct_calls_allowed()
        # Writes through aliases are counted on the tensors they land in, as an in-place op counts them: autograd
        # then refuses a backward through a param the step has changed, as after an eager step.
        changed: list[Tensor] = []
        large_layouts = self._large_layouts(plan)
        for chunk in reversed(plan.chunks) if reverse else plan.chunks:
            large = chunk.layout in large_layouts
            kind = (chunk.layout, large)
            kernel_key = key + (chunk.layout, len(chunk.params)) + (("large",) if large else ())
            if kind not in kernels:
                kernels[kind] = self._flat_kernel(kernel_key, options, chunk, grads, tscalars, twd, update, large)
            kernel = kernels[kind]
            if kernel is None:
                continue
            run, shaped, returned, fast, written = kernel
            if direct and fast is not None:
                run = fast
            try:
                if chunk.strided_grads:
                    chunk_grads = [_flat_alias(grads[i], (grads[i].numel(),) if chunk.grad_shape == (-1,)
                                               else chunk.grad_shape) for i in chunk.idx]
                elif shaped:
                    chunk_grads = [grads[i] for i in chunk.idx]
                else:
                    chunk_grads = [grads[i].view(chunk.grad_shape) for i in chunk.idx]
                result = run(*chunk.params, *chunk_grads, *chunk.grad_pads, *chunk.state_args, *tail)
                changed += _written_tensors(chunk, grads, written)
            except Exception as err:  # noqa: BLE001 - a kernel that cannot run falls back to eager
                self._compile_failed(kernel_key, err)
                kernels[kind] = None
                continue
            if returned:
                slots = len(chunk.params)
                result = result[len(result) - slots * len(returned):]
                for j, name in enumerate(returned):
                    for s, i in enumerate(chunk.idx):  # pad slots' values are dropped
                        outputs[name][i] = result[j * slots + s]
            done.extend(chunk.idx)
        torch._C._increment_version(changed)
        return done

    def _scratch(self, p: Tensor, g: Tensor, state: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """Stand-ins that pad the last chunk of a fused call (their values are never read).

        Each pad slot has its own tensor: repeating one tensor would make the inputs alias each other, and
        the compiled graph would then guard on (and recompile for) the aliasing pattern of each chunk.
        Pads of param-sized states have two elements; a state of another fixed size (one number per tensor)
        keeps that size, which the compiled graph may have specialised on.
        """
        sizes = {k: 2 if v.numel() == p.numel() else v.numel() for k, v in state.items()}
        key = (p.device, p.dtype, g.dtype, tuple((k, v.dtype, sizes[k]) for k, v in state.items()))
        cache = self._scratch_cache
        if key not in cache:
            def pads(dtype, n=2):
                return [torch.zeros(n, dtype=dtype, device=p.device) for _ in range(_FUSE_CHUNK)]
            cache[key] = {"param": pads(p.dtype), "grad": pads(g.dtype),
                          **{k: pads(v.dtype, sizes[k]) for k, v in state.items()}}
        return cache[key]

    # -------------------------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict after checking it fits: same optimizer type, same parameter layout.

        Raises ValueError/TypeError naming the mismatch before anything changes. State buffers keep
        the dtype this optimizer stores them in (float32 states of bfloat16 params stay float32).
        """
        name = type(self).__name__
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError(f"{name}.load_state_dict takes the dict returned by state_dict() "
                            f"(keys 'state' and 'param_groups')")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}: the state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        id_map: dict[Any, tuple[Tensor, dict[str, Any]]] = {}
        filled_groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}: param group {gi} of the state_dict holds {len(saved['params'])} "
                                 f"params, this optimizer's holds {len(group['params'])}")
            # torch.optim's and the authors' packages' groups may lack maximize (older torch; packages without it).
            saved = {"maximize": False, **self.later_defaults,
                     **{k: group[k] for k in self.package_group_gaps if k in group},
                     **{self.package_group_names.get(k, k): v for k, v in saved.items()}}
            filled_groups.append(saved)
            missing = [k for k in self.defaults if k not in saved]
            if missing:
                raise ValueError(f"{name}: the state_dict is not from a {name} (param group {gi} lacks "
                                 f"{missing})")
            self._check_hyperparams(saved, where=f" (state_dict param group {gi})")
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for sid, p in zip(saved["params"], group["params"]):
                id_map[sid] = (p, merged)
        exact: list[tuple[Tensor, str, Tensor, torch.dtype]] = []
        states = {}
        for sid, st in state_dict["state"].items():
            if sid not in id_map:
                raise ValueError(f"{name}: the state_dict has state for parameter id {sid!r}, which no param "
                                 f"group lists")
            p, group = id_map[sid]
            template = self.init_state(torch.empty_like(p, device="meta"), group)
            optional = set(self.optional_states)
            required, allowed = (set(template) - optional) | {"step"}, set(template) | optional | {"step"}
            # torch.optim.SGD keeps momentum_buffer None without momentum, and counts no steps: a buffer it has
            # says it has stepped.
            st = self.from_package_state({self.package_state_names.get(k, k): v for k, v in st.items()
                                          if v is not None and k not in self.package_only_states}, group)
            if self.loads_stepless_state and "step" not in st and set(template) <= set(st) <= allowed:
                st["step"] = max(int(group.get("k", 1)), 1)
            states[sid] = st
            if not required <= set(st) <= allowed:
                expected = sorted(required) + [f"{k} (optional)" for k in sorted(allowed - required)]
                raise ValueError(f"{name}: the state of parameter {sid} has keys {sorted(st)}, expected "
                                 f"{expected}: the state_dict is from another optimizer or options")
            unused = {k: torch.empty_like(p, dtype=self.state_dtype_for(p), device="meta")
                      for k in optional & set(st) - set(template)}
            for k, t in {**template, **unused}.items():
                if k not in st:
                    continue
                v = st[k]
                if (k in self.flat_states and isinstance(v, Tensor) and v.dim() == 1 and v.shape != t.shape
                        and v.numel() == t.numel()):
                    v = st[k] = v.reshape(t.shape)
                if not isinstance(v, Tensor) or v.shape != t.shape:
                    got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                    raise ValueError(f"{name}: state {k!r} of parameter {sid} has shape {got}, expected "
                                     f"{tuple(t.shape)} (parameter shape {tuple(p.shape)}): another layout")
                exact.append((p, k, v, t.dtype))
        super().load_state_dict({**state_dict, "state": states, "param_groups": filled_groups})
        self._plans.clear()
        for p, k, v, dtype in exact:
            if (v.shape == p.shape and mt.plain(p) and mt.plain(v) and not p.is_complex() and not v.is_complex()
                    and mt.dense(p)):
                # In the param's memory order (a checkpoint of a contiguous run loaded onto channels_last params):
                # states in another order than their param keep it off the fused path.
                self.state[p][k] = torch.empty_like(p, dtype=dtype).copy_(v.detach())
            else:
                self.state[p][k] = v.detach().to(device=p.device, dtype=dtype, copy=True)
        for p in list(self.state):
            st = self.state[p]
            if "step" in st and isinstance(st["step"], Tensor):
                st["step"] = int(st["step"].item())
