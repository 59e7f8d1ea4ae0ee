"""Peak memory of temporaries: the bytes PyTorch's CPU allocator hands out while a function runs.

Dev helper for the per-forward patch's test and benchmark (not part of the pack). It reads the
memory events of ``torch.profiler`` (every allocation and free through PyTorch's CPU allocator
on the calling thread, attributed to the operator that made it) and returns the highest running
total, erring high: what an operator allocates counts from its start, what it frees (its own
temporaries, net of its callees') until its end. A tensor the function returns counts as still alive; memory
that BLAS / oneDNN allocate on their own, outside PyTorch's allocator, is not seen.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak bytes allocated and not yet freed while ``fn`` ran, ``fn``'s result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    changes = []  # (time, bytes): allocations at their operator's start, frees at its end
    for e in prof.events():
        usage = e.self_cpu_memory_usage
        if usage:
            changes.append((e.time_range.start if usage > 0 else e.time_range.end, usage))
    now = peak = 0
    for _, usage in sorted(changes, key=lambda c: (c[0], -c[1])):  # ties: allocation first
        now += usage
        peak = max(peak, now)
    return peak, result
