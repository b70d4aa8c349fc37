"""Optimizer step speed against the memory-traffic floor (DESIGN.md section 5).

For each registered elementwise optimizer, on N float32 parameters in T tensors, prints:
eager and fused ms/step (median after warm-up), first fused step (compile) seconds, the floor
(bytes read+written per step / measured bandwidth), the ratio to it, the ratios to
torch.optim.AdamW's default step (a loop over the tensors on the CPU, for-each ops on a GPU) and to its fused
step, timed interleaved in the same run,
and the state bytes per parameter actually allocated. With AdamW among the methods, a last line times
steepest's fused AdamW on torch's fused AdamW's own buffers (the ratio without any placement difference).

Words moved per step are counted as 3 + 2 * state_words per parameter (read p, g and each state
word; write p and each state word): the floor every row shares. Each method's own floor ("alg") counts what
its step must move, found by stepping a small model: g, p unless the step overwrites it, and the param-sized
states whose old values the step uses read; p and the states the step changes written (an initial point such
as DoG's x0 is read only); plus the words an update that waits on a reduction (over the model or a whole tensor)
makes it read twice (registry ``reread_words``).

The bandwidth behind each floor is measured on the very tensors the step touches (``p.lerp_(g, 0)`` and
``s.lerp_(g, 0)`` for each param-sized state: read two, write one, values unchanged), timed interleaved with
the steps: on a virtual machine the bandwidth of separately allocated buffers can differ by 1.5x, so a floor
from other buffers says little about these. The best bandwidth of in-place kernels on fresh buffers
(``a.addcmul_(b, c)``, ``a.lerp_(b, w)``, torch's fused AdamW) is printed for reference. A read-only stream over the
same buffers (a sum of each) gives each step a read floor, and its last column, the time of a read-only word over
that of a floor word: where writes overlap the reads (a write-back cache on a machine whose cores are bound by
their reads), it is ~1.5 (a floor word is two reads and a write over three), and a step that mostly reads, such as
one that waits on a reduction over the model, is bound by its read floor rather than by the shared one.

    python benchmarks/step_speed.py                      # 16M params in 40 tensors, every method
    python benchmarks/step_speed.py --numel 4000000 --only adamw,lion --rounds 15
    python benchmarks/step_speed.py --channels-last       # conv weights in channels_last
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch

import steepest
from steepest.core.registry import methods


def _best_ms(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def measure_bandwidth(numel: int, repeats: int = 8) -> tuple[float, dict[str, float]]:
    """Bytes per second of the fastest in-place streaming kernel (and torch's fused AdamW).

    The streaming kernels run on buffers at least as large as an optimizer's working set (>= 2**26 floats
    each): on buffers that fit in a large last-level cache they would report cache bandwidth, not memory's.
    """
    big = max(numel, 1 << 26)
    a, b, c = (torch.randn(big) for _ in range(3))
    rates = {}
    ms = _best_ms(lambda: a.addcmul_(b, c, value=1e-9), repeats)
    rates["addcmul_"] = 4 * 4 * big / (ms / 1e3)
    ms = _best_ms(lambda: a.lerp_(b, 0.001), repeats)
    rates["lerp_"] = 3 * 4 * big / (ms / 1e3)
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    fused = torch.optim.AdamW([p], lr=1e-6, fused=True)
    fused.step()
    ms = _best_ms(fused.step, repeats)
    rates["torch fused AdamW"] = 7 * 4 * numel / (ms / 1e3)
    return max(rates.values()), rates


def make_params(numel: int, tensors: int, seed: int = 0, matrix: bool = True, channels_last: bool = False):
    """`tensors` params of numel/tensors elements each: weight matrices (rows x the largest column count up to
    1024 that divides the size), as most of a model's elements are, or flat vectors; or 3x3 conv weights of 64 input
    channels in channels_last (gradients in the same order, as autograd gives them), numel rounded down to whole
    output channels. Elementwise updates do not care; per-channel ones (AdamP, SGDP) project matrices, not
    vectors."""
    g = torch.Generator().manual_seed(seed)
    per = numel // tensors
    if channels_last:
        shape = (max(per // (64 * 9), 1), 64, 3, 3)
    else:
        cols = max(c for c in range(1, min(per, 1024) + 1) if per % c == 0) if matrix else per
        shape = (per // cols, cols) if per // cols > 1 else (cols,)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).contiguous(memory_format=layout))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).contiguous(memory_format=layout)
        params.append(p)
    return params


def state_bytes_per_param(opt, params) -> float:
    total = 0
    for p in params:
        for v in opt.state[p].values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


def _closure():
    return torch.tensor(1.0)


def algorithm_words(info, kwargs) -> tuple[int, int]:
    """Words per parameter the method's step must read and write, found on a small model: it reads g, p unless
    the step overwrites it, and each param-sized state whose old value the step uses; it writes p and each state
    the step changes; plus ``info.reread_words`` read twice.

    A state is written if a step with new gradients changes it; p or a state is read if a NaN put into it reaches
    p or a state (an overwritten value leaves no trace).
    """
    needs_closure = getattr(info.cls, "needs_closure", False)

    def fresh():
        params = make_params(4 * 1024, 4, seed=1)
        opt = info.cls(params, compile=False, **kwargs)
        step = (lambda: opt.step(_closure)) if needs_closure else opt.step
        step()
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        state = opt.state[params[0]]
        names = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == params[0].shape]
        return params, state, names, step

    params, state, names, step = fresh()
    before = {k: state[k].clone() for k in names}
    step()
    written = [k for k in names if not torch.equal(before[k], state[k])]
    read = 0
    for target in [None, *names]:  # None: p itself
        params, state, names, step = fresh()
        with torch.no_grad():
            (params[0] if target is None else state[target]).fill_(float("nan"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()
        read += any(torch.isnan(t).any() for t in [params[0], *(state[k] for k in names)])
    return 1 + read + info.reread_words, 1 + len(written)


def own_stream(opt, params):
    """A step-sized stream over opt's own buffers: ``x.lerp_(g, 0)`` for the params and every param-sized
    state (reads x and g, writes x unchanged). Returns the callable and the float32 words it moves.

    The states go slot by slot (every tensor's first state, then every tensor's second, ...), so that a
    gradient is read again only after a sweep over the whole model: taken tensor by tensor, a 1.7 MB gradient
    stays in the last-level cache for its tensor's next state, the stream moves fewer words from memory than
    it counts, and the floor comes out too low for methods with several states (torch's fused AdamW over its
    floor measured 1.09 that way, 0.99 slot by slot; Optimistic AMSGrad with 4 states 1.26 and 1.04)."""
    states = [[s for s in opt.state[p].values() if torch.is_tensor(s) and s.shape == p.shape
               and s.dtype == p.dtype] for p in params]
    slots = max((len(st) for st in states), default=0)
    pairs = [(p, p.grad) for p in params]
    pairs += [(st[j], p.grad) for j in range(slots) for p, st in zip(params, states) if j < len(st)]
    targets, sources = [t for t, _ in pairs], [s for _, s in pairs]

    def run():
        with torch.no_grad():
            torch._foreach_lerp_(targets, sources, 0.0)
    return run, 3 * sum(t.numel() for t in targets)


def own_read_stream(opt, params):
    """A read-only stream over the same buffers as :func:`own_stream` (a sum of each, slot by slot). Returns the
    callable and the float32 words it reads.

    On a machine whose reads run slower than its in-place streams move words (this project's 2-core VM: ~30 GB/s
    read against ~50 GB/s read+written), a method that reads most of its words is bound by this rate, not by the
    shared floor: its read floor is the words it reads at this stream's speed."""
    states = [[s for s in opt.state[p].values() if torch.is_tensor(s) and s.shape == p.shape
               and s.dtype == p.dtype] for p in params]
    slots = max((len(st) for st in states), default=0)
    tensors = [p.detach() for p in params] + [p.grad for p in params]
    tensors += [st[j] for j in range(slots) for st in states if j < len(st)]

    def run():
        with torch.no_grad():
            for t in tensors:
                t.sum()
    return run, sum(t.numel() for t in tensors)


def time_rounds(steps: dict, rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Ms of each candidate in each round, all timed in every round so that drift hits all alike, in an order
    shuffled per round (a kernel right after one on the same buffers finds part of them in the last-level
    cache), after `warmup` untimed rounds (the first steps in a process page-fault their temporaries in until
    the C allocator has grown its thresholds)."""
    times = {k: [] for k in steps}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    order = list(steps)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            steps[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def round_ratio(times: dict[str, list[float]], num: str, den: str, scale: float = 1.0) -> float:
    """The median over rounds of scale * num / den, each round's pair timed a fraction of a second apart: this
    VM's memory speeds up and slows down by ~1.5x over seconds, which a ratio of medians over the whole run
    would mix in."""
    return statistics.median(scale * a / b for a, b in zip(times[num], times[den]))


def same_buffers(params, rounds: int) -> None:
    """steepest's fused AdamW and torch's fused AdamW on the very same params, grads and state tensors (ours
    points its exp_avg and exp_avg_sq at torch's), timed interleaved: no buffer-placement difference between
    the two, so the ratio is the steps' own."""
    ref = torch.optim.AdamW(params, lr=1e-6, fused=True)
    ref.step()
    ours = steepest.AdamW(params, lr=1e-6, compile=True)
    for p in params:
        ours.state[p].update(step=1, exp_avg=ref.state[p]["exp_avg"], exp_avg_sq=ref.state[p]["exp_avg_sq"])
    ours.step()
    times = time_rounds({"ours": ours.step, "torch": ref.step}, rounds)
    ms = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nsame buffers as torch fused AdamW: steepest fused AdamW {ms['ours']:.2f} ms, torch fused "
          f"{ms['torch']:.2f} ms, ratio {round_ratio(times, 'ours', 'torch'):.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16 * 2**20)
    ap.add_argument("--tensors", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--only", default="", help="comma-separated method names")
    ap.add_argument("--no-fused", action="store_true", help="skip the compiled path")
    ap.add_argument("--flat", action="store_true", help="1-D params instead of weight matrices")
    ap.add_argument("--channels-last", action="store_true",
                    help="3x3 conv weights in channels_last (model.to(memory_format=torch.channels_last))")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    # glibc serves blocks above its mmap threshold with fresh pages, so a step's temporaries page-fault in on
    # every step, until freeing such a block raises the threshold; a training process has long done that
    # (activations, gradients). Without this, whichever step runs first here pays for it (torch.optim.AdamW's
    # for-loop step measured 2.4x slower in the first row than in the others).
    torch.empty(2 * args.numel // args.tensors).fill_(0.0)
    bw, rates = measure_bandwidth(args.numel)
    params = make_params(args.numel, args.tensors, matrix=not args.flat, channels_last=args.channels_last)
    args.numel = sum(p.numel() for p in params)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.numel / 1e6:.1f}M float32 params "
          f"in {args.tensors} tensors of shape {tuple(params[0].shape)}"
          + (" (channels_last)" if args.channels_last else ""))
    listed = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())
    print(f"bandwidth on fresh buffers, GB/s: {listed} (best {bw / 1e9:.1f}; floors use each step's own buffers)")
    chosen = [m for m in methods() if m.family in ("first-order", "parameter-free", "schedule-free")]
    if args.only:
        names = args.only.split(",")
        chosen = [steepest.get(n) for n in names]
    head = (f"{'method':14s} {'eager ms':>9s} {'fused ms':>9s} {'1st s':>6s} {'floor ms':>9s} {'eager/fl':>9s} "
            f"{'fused/fl':>9s} {'alg w':>5s} {'read':>4s} {'fused/alg':>9s} {'fused/rd':>8s} {'tFused/fl':>9s} "
            f"{'eager/tAdamW':>12s} "
            f"{'per word':>8s} {'fused/tAdamW':>12s} {'fused/tFused':>12s} {'state B/p':>9s} {'rd/fl w':>7s}")
    print(head)
    print("-" * len(head))
    for info in chosen:
        words = 3 + 2 * info.state_words
        kwargs = dict(info.example_kwargs)
        kwargs["lr"] = 1e-6
        alg_read, alg_written = algorithm_words(info, kwargs)
        alg_words = alg_read + alg_written
        needs_closure = getattr(info.cls, "needs_closure", False)
        try:
            eager = info.cls(params, compile=False, **kwargs)
        except TypeError:
            print(f"{info.name:14s} (skipped: does not take the engine's compile option)")
            continue
        step_e = (lambda o=eager: o.step(_closure)) if needs_closure else eager.step
        step_e()
        candidates = {"eager": step_e}
        streams = {"eager": own_stream(eager, params)}
        first_s = float("nan")
        if not args.no_fused:
            fused = info.cls(params, compile=True, **kwargs)
            step_f = (lambda o=fused: o.step(_closure)) if needs_closure else fused.step
            t = time.perf_counter()
            step_f()
            first_s = time.perf_counter() - t
            step_f()
            candidates["fused"] = step_f
            streams["fused"] = own_stream(fused, params)
        for k, (run, _) in streams.items():
            candidates[f"{k} stream"] = run
        read_run, read_words = own_read_stream(fused if "fused" in candidates else eager, params)
        candidates["read stream"] = read_run
        ref = torch.optim.AdamW(params, lr=1e-6)
        ref.step()
        candidates["torch AdamW"] = ref.step
        ref_fused = torch.optim.AdamW(params, lr=1e-6, fused=True)
        ref_fused.step()
        candidates["torch fused AdamW"] = ref_fused.step
        tfused_stream, tfused_moved = own_stream(ref_fused, params)
        candidates["torch fused stream"] = tfused_stream
        tadamw_stream, tadamw_moved = own_stream(ref, params)
        candidates["torch AdamW stream"] = tadamw_stream
        times = time_rounds(candidates, args.rounds)
        ms = {k: statistics.median(v) for k, v in times.items()}
        # floor = bytes the step must move / bandwidth of the stream over the same buffers, taken round by round
        per_word = {k: 4 * args.numel / (moved * 4) for k, (_, moved) in streams.items()}  # stream ms -> ms a word
        floor_ms = words * per_word.get("fused", per_word["eager"]) * ms["fused stream" if "fused" in ms
                                                                           else "eager stream"]
        eager_floor = round_ratio(times, "eager", "eager stream", 1 / (words * per_word["eager"]))
        fused_floor = (round_ratio(times, "fused", "fused stream", 1 / (words * per_word["fused"]))
                       if "fused" in ms else float("nan"))
        tfused_floor = round_ratio(times, "torch fused AdamW", "torch fused stream", tfused_moved / (7 * args.numel))
        tadamw_floor = round_ratio(times, "torch AdamW", "torch AdamW stream", tadamw_moved / (7 * args.numel))
        sbytes = state_bytes_per_param(eager, params)
        fused_ms = ms.get("fused", float("nan"))
        # fused time over the reads alone at the read-only stream's speed (alg_read words a param)
        fused_read = (round_ratio(times, "fused", "read stream", read_words / (alg_read * args.numel))
                      if "fused" in ms else float("nan"))
        eager_alg = eager_floor * words / alg_words  # eager time over the method's own floor
        # a word of the read-only stream over a word of the floor's in-place stream, on the same buffers
        stream = "fused" if "fused" in ms else "eager"
        read_word = round_ratio(times, "read stream", f"{stream} stream", streams[stream][1] / read_words)

        def vs_torch(name, times=times):
            return round_ratio(times, "fused", name) if "fused" in times else float("nan")
        print(f"{info.name:14s} {ms['eager']:9.2f} {fused_ms:9.2f} {first_s:6.1f} {floor_ms:9.2f} "
              f"{eager_floor:9.2f} {fused_floor:9.2f} {alg_words:5d} {alg_read:4d} "
              f"{fused_floor * words / alg_words:9.2f} {fused_read:8.2f} {tfused_floor:9.2f} "
              f"{round_ratio(times, 'eager', 'torch AdamW'):12.2f} {eager_alg / tadamw_floor:8.2f} "
              f"{vs_torch('torch AdamW'):12.2f} {vs_torch('torch fused AdamW'):12.2f} {sbytes:9.1f} "
              f"{read_word:7.2f}",
              flush=True)
        del eager, candidates, ref, ref_fused
        if not args.no_fused:
            del fused
    if not args.no_fused and any(m.name == "adamw" for m in chosen):
        same_buffers(params, args.rounds)
    print("\nfloor = (3 + 2*state_words) words/param x 4 B / bandwidth of a lerp_ stream over the same params, "
          "grads and states (eager/fl, fused/fl and tFused/fl each on its own buffers; floor ms: the fused one's); "
          "alg w = the words the method's step must move (read g, and p and the states whose old values it uses; "
          "write p and the states it changes; plus words read twice because the update waits on a reduction), read = "
          "how many of those are reads, "
          "fused/alg = fused time over that floor; fused/rd = fused time over its reads alone at the speed of a "
          "read-only stream (sums) over the same buffers; rd/fl w = the time of a word of that read-only stream over "
          "that of a floor word (above 1: a step that mostly reads, as one that waits on a reduction does, is bound "
          "by fused/rd, not by fused/alg); "
          "torch AdamW = torch.optim.AdamW() default (on the CPU a loop over the tensors), 7 words/param; "
          "per word = eager time over the "
          "method's own floor (alg w) over torch AdamW's time over its floor (time per word the step must move, "
          "eager vs torch AdamW); "
          "tFused = torch.optim.AdamW(fused=True); ratios are per step, same run, interleaved timing: the median over "
          "rounds of each round's ratio (ms columns: medians).")


if __name__ == "__main__":
    main()
