"""Choose a ProtoNet temperature for a backbone before training it episodically (``python -m bench temperature``).

A backbone pre-trained as a classifier (``init_from``) has squared distances in the hundreds: at the paper's
temperature 1 the softmax over negative distances is nearly one-hot and the loss of the first episodes is
several times its minimum over temperatures, so the first gradients mostly shrink the distances (they
reshape the backbone) instead of separating classes. This measures the loss of a few *training* episodes
(the run's own training stream, no test or validation data) at each candidate temperature, with the backbone
as the run would start, and names the one with the lowest mean loss: temperature scaling as a calibration
(Guo et al. 2017, "On Calibration of Modern Neural Networks"), applied to the metric of Snell et al. 2017.
The numbers are written next to the records, named after the backbone and the training episodes'
shape (``<results>/temperature/<backbone run>.<ways>w<shots>s.json``; the run's own temperature, being
what is chosen, plays no part in them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.config import RunConfig

TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
TEMPERATURE_DIR = "temperature"


def episode_losses(config: RunConfig, results: Path, temperatures: Sequence[float] = TEMPERATURES,
                   episodes: int = 5) -> dict[str, Any]:
    """Mean cross-entropy of ``episodes`` training episodes of ``config`` (a ProtoNet run) at each temperature,
    from the backbone the run starts with; ``{"losses": {T: loss}, "best": T, ...}``."""
    from bench.runner import build_datamodule, build_task
    from bench.weights import load_embedding

    if config.algorithm != "protonet":
        raise ValueError(f"temperature: {config.name} is a {config.algorithm} run; the temperature is ProtoNet's "
                         "(pick a protonet entry of the suite with --algorithms)")
    if episodes < 1 or not temperatures or min(temperatures) <= 0:
        raise ValueError("temperature: give at least one episode and positive temperatures")
    torch.manual_seed(config.seed)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    task = build_task(config, datamodule)
    provenance = load_embedding(task, results, config.init_from) if config.init_from else None
    task.train()  # BatchNorm as in training: the statistics of each episode
    stream = iter(datamodule.train_dataloader())
    totals = torch.zeros(len(temperatures), dtype=torch.float64)
    with torch.no_grad():
        for _ in range(episodes):
            episode = datamodule.on_after_batch_transfer(next(stream), 0)
            scores = task.scores(episode)  # before the run's own temperature
            targets = episode.query_y.flatten()
            for index, temperature in enumerate(temperatures):
                totals[index] += task.loss_fn((scores / temperature).flatten(0, 1), targets).item()
    losses = {float(t): float(total / episodes) for t, total in zip(temperatures, totals)}
    ways, shots = config.train_ways or config.ways, config.train_shots or config.shots
    return {"backbone": config.init_from, "run": config.name, "init": provenance, "episodes": episodes,
            "train_ways": ways, "train_shots": shots, "losses": losses,
            "best": min(losses, key=losses.get)}


def write_calibration(result: dict[str, Any], results: Path) -> Path:
    """Write ``result`` atomically to ``<results>/temperature/<backbone (else run)>.<ways>w<shots>s.json``."""
    stem = f"{result['backbone'] or result['run']}.{result['train_ways']}w{result['train_shots']}s"
    path = Path(results) / TEMPERATURE_DIR / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(temporary, path)
    return path


def temperature_command(suite: str, algorithms: list[str], results: Path, episodes: int,
                        temperatures: Sequence[float]) -> int:
    """Print and write the loss-per-temperature table of each chosen ProtoNet run of ``suite``."""
    from bench.suite import load_suite

    configs = [c for c in load_suite(suite, algorithms or None) if c.algorithm == "protonet"]
    if not configs:
        raise ValueError(f"temperature: suite {suite!r} has no protonet run among {algorithms or 'its entries'}")
    for config in configs:
        result = episode_losses(config, results, temperatures, episodes)
        print(f"{config.name} (backbone {config.init_from or 'freshly initialised'}), "
              f"{episodes} training episodes of {result['train_ways']} ways:")
        for temperature, loss in result["losses"].items():
            print(f"  T={temperature:<7g} loss {loss:.3f}{'   <- lowest' if temperature == result['best'] else ''}")
        print(f"  written to {write_calibration(result, results)}")
    return 0
