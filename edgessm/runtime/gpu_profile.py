"""Each GPU kernel's own time inside a call, from the torch profiler (CUPTI): where a multi-kernel
operation (the SSD split's two passes, a whole decode step replayed from a CUDA graph) spends its
time. Used by the GPU benchmarks' ``--kernel-times`` options; needs a CUDA device."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class KernelTime:
    name: str  # without namespaces, return type and arguments (short_kernel_name)
    us_per_call: float  # GPU time of all its launches in one call
    launches_per_call: float


def short_kernel_name(name: str) -> str:
    """A profiler kernel name without its namespaces, return type and arguments: "ssd_mma_kernel<__half,
    __half, 128, 1, true>" from "void essm::(anonymous namespace)::ssd_mma_kernel<...>(essm::...)"."""
    m = re.search(r"(\w+(?:<[^()]*>)?)\((?!anonymous)", name)
    return m.group(1) if m else name


def kernel_times(fn: Callable[[int], object], calls: int = 20, warmup: int = 3) -> list[KernelTime]:
    """Runs fn(0) .. fn(calls - 1) under the profiler after `warmup` unprofiled calls; the kernels they
    launched, slowest first, per call."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(i)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:  # torch < 2.4 names it cuda_time_total
            us = ev.cuda_time_total
        if us > 0:
            t = totals.setdefault(short_kernel_name(ev.key), [0.0, 0.0])
            t[0] += us / calls
            t[1] += ev.count / calls
    rows = [KernelTime(k, v[0], v[1]) for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r.us_per_call)


def format_kernel_times(rows: list[KernelTime], top: int | None = None) -> str:
    """'name: 12.3 us (x2)' items, as many as `top` (all by default)."""
    return ", ".join(f"{r.name}: {r.us_per_call:.1f} us" + (f" (x{r.launches_per_call:g})" if r.launches_per_call != 1 else "")
                     for r in rows[:top])
