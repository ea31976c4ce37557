"""Timing and memory for ``make perf``: interleaved rounds, medians, per-workload peak memory.

Every workload runs once per round, in an order rotated from round to round, so that load from
other processes hits all of them alike; a workload is summarised by the median and quartiles of
its rounds, and two workloads are compared by the ratio of their medians together with the spread
of their per-round ratios. Peak memory is measured separately, one workload at a time: on CUDA the
allocator's peak, on CPU the growth of the process's peak resident set (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs``) over its resident set before the workload.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Workload:
    """One thing to time: ``step()`` does ``units`` units of work (episodes, or one meta-iteration)."""

    name: str
    step: Callable[[], None]
    units: float = 1.0
    unit: str = "iteration"
    notes: dict = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(workloads: list[Workload], rounds: int, warmup: int, device: torch.device,
                progress: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Seconds per ``step()`` of every workload in each of ``rounds`` rounds (after ``warmup`` rounds)."""
    seconds: dict[str, list[float]] = {w.name: [] for w in workloads}
    for round_index in range(warmup + rounds):
        shift = round_index % len(workloads)
        for workload in workloads[shift:] + workloads[:shift]:
            synchronize(device)
            started = time.perf_counter()
            workload.step()
            synchronize(device)
            elapsed = time.perf_counter() - started
            if round_index >= warmup:
                seconds[workload.name].append(elapsed)
        label = "warm-up" if round_index < warmup else f"round {round_index - warmup + 1}/{rounds}"
        progress(f"  {label}: " + ", ".join(f"{w.name} {seconds[w.name][-1]:.3g}s" if round_index >= warmup
                                            else w.name for w in workloads))
    return seconds


def summary(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of a list of timings."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "q1": quartiles[0], "q3": quartiles[2],
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def ratio(slow: list[float], fast: list[float]) -> dict[str, float]:
    """``median(slow) / median(fast)`` and the range of the per-round ratios (same rounds, paired)."""
    paired = sorted(s / f for s, f in zip(slow, fast))
    return {"ratio": statistics.median(slow) / statistics.median(fast),
            "paired_min": paired[0], "paired_median": statistics.median(paired), "paired_max": paired[-1]}


def peak_memory(step: Callable[[], None], device: torch.device) -> dict[str, float | str]:
    """Peak memory of one ``step()``: CUDA allocator peak, or growth of the CPU process's peak RSS."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"bytes": peak - before, "total_bytes": peak, "method": "torch.cuda.max_memory_allocated"}
    _release_free_heap()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS (Linux >= 4.0)
        handle.write("5")
    step()
    peak = _status_bytes("VmHWM")
    return {"bytes": peak - before, "total_bytes": peak, "method": "Linux VmHWM growth over VmRSS"}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _release_free_heap() -> None:
    """Give memory freed by earlier workloads back to the OS, so it is not silently reused (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
