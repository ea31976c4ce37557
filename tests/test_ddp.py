"""Distributed episodes: under 2-process CPU DDP (gloo) the fixed test episodes are split across the
ranks and gathered so that the per-episode scores and their mean equal the single-process run
exactly, and each rank samples its own training episodes (seeded from the global seed and the rank).

Lightning's "ddp" strategy re-launches the running script, so the distributed half runs in
``tests/ddp_worker.py`` as a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.config import RunConfig
from bench.runner import make_trainer
from datamodules import OmniglotDataModule
from datamodules.base import TrainEpisodes
from tasks.protonet import ProtoNet

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
# 26 test episodes in chunks of 4: 7 chunks, so rank 0 tests 4 chunks and rank 1 tests 3.
DATAMODULE = dict(split="vinyals", ways=5, shots=1, queries=5, meta_batch=3, eval_batch=4,
                  val_episodes=4, test_episodes=26, seed=7)
SMALL_DATAMODULE = {**DATAMODULE, "test_episodes": 3}  # one chunk: rank 1 tests nothing
TASK = dict(ways=5, hidden=16)
RUN = dict(algorithm="protonet", steps=1, val_episodes=0, accelerator="cpu", seed=7)


def test_two_process_ddp_test_equals_single_process_exactly(tmp_path):
    torch.manual_seed(0)
    task = ProtoNet(**TASK)
    weights = tmp_path / "weights.pt"
    torch.save(task.state_dict(), weights)
    settings = {"datamodule": DATAMODULE, "small_datamodule": SMALL_DATAMODULE, "task": TASK, "weights": str(weights), "out": str(tmp_path),
                "run": {**RUN, "devices": 2}}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    finished = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "settings.json")], env=environment,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    # Single process, same weights, same trainer configuration, same thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = make_trainer(RunConfig.from_dict({**RUN, "devices": 1}), [], progress=False)
        datamodule = OmniglotDataModule(**DATAMODULE)
        trainer.test(task, datamodule=datamodule, verbose=False)
        single = task.test_summary
        trainer.test(task, datamodule=OmniglotDataModule(**SMALL_DATAMODULE), verbose=False)
        small = task.test_summary
    finally:
        torch.set_num_threads(threads)
    distributed = json.loads((tmp_path / "summary.json").read_text())
    assert single["episode_ids"] == list(range(26))
    assert distributed["episode_ids"] == single["episode_ids"]
    assert distributed["episode_scores"] == single["episode_scores"]  # exact, episode by episode
    assert distributed["mean"] == single["mean"] and distributed["ci95"] == single["ci95"]
    assert len(set(single["episode_scores"])) > 3  # the scores differ between episodes: a real check
    assert json.loads((tmp_path / "small_summary.json").read_text()) == small and small["episodes"] == 3

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["datamodule_rank"], r["datamodule_world_size"]) for r in ranks] == \
        [(0, 2, 0, 2), (1, 2, 1, 2)]
    # The evaluation episodes were split, not duplicated: chunks rank::2 of the 7 chunks of 4.
    assert ranks[0]["test_ids_seen"] == [*range(0, 4), *range(8, 12), *range(16, 20), *range(24, 26)]
    assert ranks[1]["test_ids_seen"] == [*range(4, 8), *range(12, 16), *range(20, 24)]
    assert all(r["steps"] == 1 for r in ranks)
    # Each rank samples its own training episodes, seeded from the global seed and its rank.
    first = [torch.tensor(r["first_train_indices"]) for r in ranks]
    assert not torch.equal(first[0], first[1])
    for rank in (0, 1):
        stream = TrainEpisodes(datamodule.samplers["train"], DATAMODULE["meta_batch"], DATAMODULE["seed"], rank)
        assert torch.equal(next(iter(stream))["indices"], first[rank])
