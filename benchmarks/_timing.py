"""Timing helpers the benchmark scripts share: GPU time between CUDA events, GPU kernel
time from torch.profiler, wall time between synchronizations, and peak memory.

Every helper runs on the current CUDA device; none is called at import, so a script
that imports this module parses its arguments on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch


def cuda_ms(fn: Callable[[], object], warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of ``fn()`` between CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Peak:
    """What :func:`peak_added` measured: ``mib``, the most memory allocated above what was
    allocated when it began."""

    mib: float = float("nan")


@contextlib.contextmanager
def peak_added() -> Iterator[Peak]:
    """Measures the peak memory the block allocates on top of what it finds allocated."""
    peak = Peak()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    yield peak
    torch.cuda.synchronize()
    peak.mib = (torch.cuda.max_memory_allocated() - before) / 2**20


def peak_mib_added(fn: Callable[[], object]) -> float:
    """Peak MiB one call of ``fn()`` allocates on top of what is allocated before it."""
    with peak_added() as peak:
        fn()
    return peak.mib


def cuda_ms_and_peak(
    fn: Callable[[], object], warmup: int = 2, iters: int = 10
) -> tuple[float, float]:
    """(median ms between CUDA events, peak MiB added) over the same ``iters`` calls of
    ``fn()``, after ``warmup`` calls that count for neither."""
    for _ in range(warmup):
        fn()
    with peak_added() as peak:
        ms = cuda_ms(fn, warmup=0, iters=iters)
    return ms, peak.mib


def kernel_us(calls: list[Callable[[], object]], repeat: int = 5) -> tuple[float, float]:
    """(GPU kernel time per call in us, kernels per call): the durations of the kernels
    ``calls`` launch, summed by torch.profiler, so host launch overhead does not count;
    each of ``calls`` runs once untimed, then ``repeat`` times in turn (rotate them over
    inputs the L2 cache cannot hold to time from memory)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for call in calls:
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            for call in calls:
                call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    n = repeat * len(calls)
    if not kernels:  # older profilers keep device time on the CPU ops only
        total = sum(e.self_device_time_total for e in prof.key_averages())
        return total / n, float("nan")
    return sum(e.time_range.elapsed_us() for e in kernels) / n, len(kernels) / n


def wall_s(fn: Callable[[], object], calls: int = 1, warmup: int = 0) -> float:
    """Wall seconds per call of ``fn()``: ``warmup`` calls, then ``calls`` back to back
    between two CUDA synchronizations (one call: a training step's time; many small
    calls: the host's time per call, the GPU never the bottleneck)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def peak_gib() -> float:
    """The process's peak allocated GPU memory so far, GiB (``max_memory_allocated``)."""
    return torch.cuda.max_memory_allocated() / 2**30
