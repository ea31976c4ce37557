"""The allocator setting of training processes (bench/allocator.py)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bench import allocator
from bench.allocator import configure_allocator

ROOT = Path(__file__).resolve().parents[1]
GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: apply the setting, then malloc, touch and free 64 MiB (above glibc's largest dynamic
# mmap threshold) and print how much of it the process still holds.
_HELD_AFTER_FREE = """
import ctypes, ctypes.util
from bench.allocator import configure_allocator
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
setting = configure_allocator()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
before = rss_kib()
block = libc.malloc(ctypes.c_size_t(size))
ctypes.memset(block, 1, size)
libc.free(ctypes.c_void_p(block))
print(setting, rss_kib() - before)
"""


def _held_after_free(setting: str) -> tuple[str, int]:
    env = {**os.environ, allocator.ENVIRONMENT_VARIABLE: setting, "PYTHONPATH": str(ROOT)}
    output = subprocess.run([sys.executable, "-c", _HELD_AFTER_FREE], env=env, check=True, capture_output=True,
                            text=True).stdout.split()
    return output[0], int(output[1])


def test_an_unknown_setting_is_refused_with_the_valid_ones(monkeypatch):
    monkeypatch.setenv(allocator.ENVIRONMENT_VARIABLE, "jemalloc")
    with pytest.raises(ValueError, match="METABENCH_ALLOCATOR='jemalloc'.*'retain'.*'default'"):
        configure_allocator()


def test_default_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv(allocator.ENVIRONMENT_VARIABLE, "default")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *args: pytest.fail("mallopt called for 'default'"))
    assert configure_allocator() == "default"


def test_retain_keeps_freed_memory_in_the_process_and_default_returns_it():
    retained_setting, retained_kib = _held_after_free("retain")
    default_setting, default_kib = _held_after_free("default")
    assert default_setting == "default" and default_kib < 16 << 10  # glibc unmapped the 64 MiB block
    if GLIBC_LINUX:
        assert retained_setting == "retain" and retained_kib > 48 << 10  # still resident, for the next step
    else:
        assert retained_setting == "default"
