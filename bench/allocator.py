"""CPU memory allocator setting for training and benchmark processes.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB with its default dynamic
threshold) with a fresh ``mmap`` and returns it to the kernel on ``free``. A CPU training step allocates
its large activations anew each step (a 20-way 5-shot Omniglot episode through Conv-4: 80 MiB per
first-block tensor), so each step pays the kernel's page faults to zero those pages again: in a profile
of ProtoNet's 20w5s15q step on one thread, 9% of the time was the zero-fill of max-pooling's gradient
alone, a zero-fill of freshly mapped pages. Raising the mmap threshold and the trim threshold keeps freed
memory in the process for the next step. This changes where memory comes from, never what is computed.

Opt-in: ``METABENCH_ALLOCATOR=retain`` applies it to ``bench run`` processes; unset or ``default`` leaves
glibc's behaviour as it is. Commit 0974532 tried a stronger form (no mmap at all); cb6e45c dropped it: inside
``make perf``'s single interleaved process the one-batch proxy ran 3.4x slower and MAML/FOMAML were level.
``make perf-allocator`` measures this form one fresh process per setting, as training runs use it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENVIRONMENT_VARIABLE = "METABENCH_ALLOCATOR"
RETAIN, DEFAULT = "retain", "default"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc's malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 30                   # allocations up to 1 GiB come from the heap
TRIM_THRESHOLD_BYTES = (1 << 31) - 1             # never give freed heap memory back to the kernel


def requested_setting() -> str:
    """The allocator setting asked for by ``METABENCH_ALLOCATOR`` ("default" unless told "retain")."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, DEFAULT).strip().lower()
    if value not in (RETAIN, DEFAULT):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r} is not a setting: use {RETAIN!r} (keep freed "
                         f"memory in the process, faster) or {DEFAULT!r} (glibc's own behaviour)")
    return value


def configure_allocator() -> str:
    """Apply the requested setting to this process; return what is in effect ("retain" or "default").

    Only glibc on Linux can be tuned; elsewhere (macOS, musl) the process keeps its allocator and
    "default" is returned. Call it once, before the large allocations of a run.
    """
    if requested_setting() == DEFAULT or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return DEFAULT
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = (libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD_BYTES))
               and libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_BYTES)))
    return RETAIN if applied else DEFAULT
