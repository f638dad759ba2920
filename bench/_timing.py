"""Timing shared by the bench scripts: every timed repetition of an op is preceded by one timed
fp32 copy (dst.copy_(src) on separate buffers), so the machine's noise hits the op and its
bandwidth baseline alike; medians over the repetitions, time.perf_counter.

Also the process setup those timings need: glibc malloc told to keep freed large blocks (so a
fresh 64 MB output does not page-fault a new mmap on every call) and the OpenMP thread count,
both of which must be in place before torch loads (`reexec_steady`), or set in-process with
mallopt where re-executing is not possible (`steady_malloc`, the pytest-benchmark files).
"""
import ctypes
import os
import statistics
import sys
import time

# torch is imported inside the functions: a script calls reexec_steady before torch loads.

_REEXEC_FLAG = "LOWBIT_BENCH_REEXEC"


def reexec_steady(script, threads, malloc_tune=True):
    """Re-run `script` once with a steady malloc and OMP_NUM_THREADS in the environment (both
    are read when the process starts). Returns in the re-executed process."""
    if os.environ.get(_REEXEC_FLAG) == "1":
        return
    env = dict(os.environ)
    env[_REEXEC_FLAG] = "1"
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if malloc_tune:
        env.setdefault("MALLOC_MMAP_MAX_", "0")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 40))
    sys.stdout.flush()
    try:
        os.execve(sys.executable, [sys.executable, os.path.abspath(script)] + sys.argv[1:], env)
    except OSError as e:  # run in-process without the tuning rather than not at all
        print(f"note: could not re-exec with the malloc setting ({e}); continuing without it")


def steady_malloc():
    """glibc only, in-process: stop serving large allocations with mmap and stop trimming the
    heap, as the MALLOC_MMAP_MAX_=0 / MALLOC_TRIM_THRESHOLD_ settings of `reexec_steady` do."""
    if os.environ.get("LOWBIT_BENCH_MALLOC_TUNE", "1") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
    except (OSError, AttributeError):
        pass


class Timing:
    def __init__(self, times, copies, median=None, min_=None):
        self.times = times      # seconds, one per timed repetition
        self.copies = copies    # seconds of the fp32 copy timed just before each repetition
        self._median, self._min = median, min_   # set for derived (summed) timings

    @property
    def median(self):
        return self._median if self._median is not None else statistics.median(self.times)

    @property
    def min(self):
        return self._min if self._min is not None else min(self.times)

    @property
    def copy_median(self):
        return statistics.median(self.copies)


class Bench:
    """Copy-interleaved timer of calls on an input of n fp32 elements. `args` gives warmup,
    reps, min_reps and max_seconds (stop repeating after that once min_reps are in)."""

    def __init__(self, n, args):
        import torch
        self.args = args
        self.n = n
        # copy baseline on its own buffers, so it does not warm the op's input in cache
        self.copy_src = torch.randn(n)
        self.copy_dst = torch.empty_like(self.copy_src)
        self.all_copies = []

    def copy_once(self):
        t0 = time.perf_counter()
        self.copy_dst.copy_(self.copy_src)
        return time.perf_counter() - t0

    def time(self, fn, warmup=None):
        a = self.args
        for _ in range(a.warmup if warmup is None else warmup):
            out = fn()
            del out
        self.copy_once()
        times, copies = [], []
        start = time.perf_counter()
        for i in range(a.reps):
            copies.append(self.copy_once())
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
            if i + 1 >= a.min_reps and time.perf_counter() - start > a.max_seconds:
                break
        self.all_copies += copies
        return Timing(times, copies)


def timed_plain(fn, args):
    """Timing of a baseline with no interleaved copy (the copy rows themselves)."""
    for _ in range(args.warmup):
        fn()
    times = []
    start = time.perf_counter()
    for i in range(max(args.reps, 5)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if i + 1 >= max(args.min_reps, 5) and time.perf_counter() - start > args.max_seconds:
            break
    return Timing(times, times)


def copy_timer(n):
    """A function timing one fp32 copy of n elements (seconds): the bandwidth baseline taken
    just before every timed optimizer step."""
    import torch
    src, dst = torch.randn(n), torch.empty(n)

    def copy():
        t0 = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0
    return copy


def time_steps(opt, copy, reps, warmup=2, max_seconds=20.0):
    """(median step s, median copy s, reps) of opt.step(), each step after one timed copy."""
    for _ in range(warmup):
        opt.step()
    times, copies = [], []
    start = time.perf_counter()
    for _ in range(reps):
        copies.append(copy())
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times), statistics.median(copies), len(times)
