"""Choosing a ProtoNet temperature from the first training episodes (bench.temperature)."""
from __future__ import annotations

import json
import math

import pytest

from bench.config import RunConfig
from bench.temperature import episode_losses, write_calibration

TINY = dict(algorithm="protonet", dataset="omniglot", ways=5, shots=1, queries=2, train_ways=10, steps=0,
            val_episodes=0, test_episodes=10, eval_batch=5, threads=1)


def test_losses_per_temperature_are_deterministic_and_tend_to_chance(tmp_path):
    config = RunConfig(**TINY)
    result = episode_losses(config, tmp_path, [1.0, 10.0, 1e7], episodes=2)
    assert result == episode_losses(config, tmp_path, [1.0, 10.0, 1e7], episodes=2)  # same seed, same episodes
    losses = result["losses"]
    assert all(math.isfinite(loss) for loss in losses.values())
    # A huge temperature flattens the softmax: the loss of a uniform guess over the 10 training ways.
    assert losses[1e7] == pytest.approx(math.log(10), abs=1e-3)
    assert result["best"] == min(losses, key=losses.get) and result["train_ways"] == 10
    path = write_calibration(result, tmp_path)
    assert json.loads(path.read_text())["losses"] == {str(t): loss for t, loss in losses.items()}


def test_only_protonet_runs_have_a_temperature(tmp_path):
    with pytest.raises(ValueError, match="the temperature is ProtoNet's"):
        episode_losses(RunConfig(**{**TINY, "algorithm": "matching"}), tmp_path)
