"""Test setup: real data from METABENCH_DATA (CI exports ../shared/data), caches in the repo's .cache."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
_shared = REPO.parent / "shared" / "data"
if "METABENCH_DATA" not in os.environ and _shared.is_dir():
    os.environ["METABENCH_DATA"] = str(_shared)
os.environ.setdefault("METABENCH_CACHE", str(REPO / ".cache"))
os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore", module="gym")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def omniglot_vinyals():
    """A set-up Vinyals-split Omniglot data module (5-way 1-shot, 15 queries) on the real data."""
    from datamodules import OmniglotDataModule

    datamodule = OmniglotDataModule(split="vinyals", ways=5, shots=1, queries=15, meta_batch=4,
                                    val_episodes=20, test_episodes=40, eval_batch=10, seed=0)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture
def count_ops():
    """``count_ops(fn)``: the number of ATen operations ``fn()`` runs (to show work is batched, not per item)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    def count(fn) -> int:
        with OpCounter() as counter:
            fn()
        return counter.count

    return count
