"""The harness's malloc setting: large blocks freed by one training step are reused by the next without
faulting their pages in again (bench/allocator.py). Measured in fresh processes, whose heaps start alike."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.allocator import _glibc, keep_freed_memory

STEPS = """
import json, resource, sys, torch
from bench.allocator import GLIBC_DEFAULTS, keep_freed_memory, set_malloc_parameters
setting = keep_freed_memory() if sys.argv[1] == "reuse" else set_malloc_parameters(GLIBC_DEFAULTS)
faults = []
for _ in range(4):  # a "step": eight 16 MiB activations alive at once, written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(4 * 2 ** 20) for _ in range(8)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"setting": setting, "faults": faults}))
"""


def minor_faults_per_step(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1], env={"PYTHONPATH": "."}, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt is a glibc function")
def test_freed_blocks_are_reused_without_page_faults_where_glibc_defaults_fault_them_in_every_step():
    default, reuse = minor_faults_per_step("default"), minor_faults_per_step("reuse")
    # glibc's documented defaults, fixed (its adaptive threshold varies run to run): every block is mapped
    # afresh and unmapped on free, so each step faults its 32,768 pages in again.
    assert default["setting"] is True and min(default["faults"]) > 16000
    assert reuse["setting"] == {"malloc": "reuse freed memory",
                                "mallopt": {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2 ** 31 - 1}}
    assert reuse["faults"][-1] < 100             # once the heap has grown, nothing faults


def test_the_environment_can_leave_the_c_library_as_it_is(monkeypatch):
    monkeypatch.setenv("METABENCH_ALLOCATOR", "default")
    assert keep_freed_memory() == {"malloc": "default", "why": "METABENCH_ALLOCATOR=default"}
