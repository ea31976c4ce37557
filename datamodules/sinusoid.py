"""Regression task families, episodes made on the device: MAML's sinusoids and random linear functions.

* ``sinusoid`` -- Finn, Abbeel & Levine 2017 (MAML), Sec. 5.1: ``y = A sin(x - phi)`` with amplitude
  ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``; K support points, MSE.
* ``linear`` -- the linear-regression toy of the meta-learning primers: ``y = w . x (+ noise)`` with a
  fresh weight vector ``w ~ N(0, I_d)`` per task and inputs ``x ~ N(0, I_d)``.

A training meta-batch is drawn in one vectorised call on the training device, from a generator
seeded by (seed, rank, draw number), so the data loader only moves the draw number. Validation and
test tasks are drawn once, on the CPU, from fixed seeds that do not depend on the run's seed: every
algorithm on every machine sees the same evaluation tasks. Episodes are :class:`Episode` objects with
``ways = 1``: ``support_x [tasks, K, d]``, ``support_y [tasks, K, 1]`` (float), the query set alike;
``shots`` is K and ``queries`` the number of query points per task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.base import EVAL_SEEDS, EpisodicDataModule, FixedEpisodes
from datamodules.download import DataError
from datamodules.episodes import Episode, seeded_generator

MLP_WIDTH = 40  # MAML's regression network: two hidden layers of 40 units (Sec. 5.1)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device) * (high - low) + low


class TaskFamily:
    """A distribution over regression functions on ``R^in_features``."""

    name = "regression"
    in_features = 1

    def sample(self, tasks: int, points: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``tasks`` functions, ``points`` inputs each: ``x [tasks, points, d]``, ``y [tasks, points, 1]``,
        on the generator's device."""
        raise NotImplementedError


@dataclass(frozen=True)
class Sinusoids(TaskFamily):
    """``y = A sin(x - phi)``, ``A ~ U[amplitude]``, ``phi ~ U[phase]``, ``x ~ U[inputs]`` (MAML's ranges)."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    inputs: tuple[float, float] = (-5.0, 5.0)
    name = "sinusoid"

    def sample(self, tasks: int, points: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        amplitude = _uniform((tasks, 1, 1), *self.amplitude, generator)
        phase = _uniform((tasks, 1, 1), *self.phase, generator)
        x = _uniform((tasks, points, 1), *self.inputs, generator)
        return x, amplitude * torch.sin(x - phase)


@dataclass(frozen=True)
class LinearFunctions(TaskFamily):
    """``y = w . x + noise * eps`` with ``w, x ~ N(0, I_dim)`` and ``eps ~ N(0, 1)``."""

    dim: int = 5
    noise: float = 0.0
    name = "linear"

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self.dim

    def sample(self, tasks: int, points: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = generator.device
        weights = torch.randn(tasks, self.dim, 1, generator=generator, device=device)
        x = torch.randn(tasks, points, self.dim, generator=generator, device=device)
        y = x @ weights
        if self.noise:
            y = y + self.noise * torch.randn(y.shape, generator=generator, device=device)
        return x, y


def device_generator(device: torch.device, *seeds: int) -> torch.Generator:
    """A generator on ``device`` seeded from several integers (mixed as :func:`seeded_generator` does)."""
    return torch.Generator(device=device).manual_seed(seeded_generator(*seeds).initial_seed())


def regression_episode(points: torch.Tensor, shots: int, ids: torch.Tensor) -> Episode:
    """Split ``points [tasks, shots + queries, d + 1]`` (inputs, then the target) into an Episode."""
    x, y = points[..., :-1], points[..., -1:]
    return Episode(support_x=x[:, :shots], support_y=y[:, :shots], query_x=x[:, shots:], query_y=y[:, shots:],
                   ids=ids, ways=1)


class TrainDraws(IterableDataset):
    """Endless training batches ``{"draw": n, "ids": -1s}``; the points are made on the device."""

    def __init__(self, tasks: int) -> None:
        self.tasks = tasks

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ids = torch.full((self.tasks,), -1, dtype=torch.long)
        draw = 0
        while True:
            yield {"draw": torch.tensor(draw), "ids": ids}
            draw += 1


class FixedTasks(FixedEpisodes):
    """Fixed evaluation tasks (packed points) in chunks, sharded across ranks like image episodes."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        chunk = super().__getitem__(index)
        return {"points": chunk["indices"], "ids": chunk["ids"]}


class RegressionDataModule(EpisodicDataModule):
    """Few-shot regression episodes of a :class:`TaskFamily`; arguments as :class:`EpisodicDataModule`.

    ``shots`` is the number of support points K and ``queries`` the number of query points per task;
    ``ways`` must be 1 (a regression task has no classes).
    """

    def __init__(self, family: TaskFamily, **kwargs) -> None:
        kwargs.setdefault("ways", 1)
        super().__init__(**kwargs)
        self.family = family
        if self.ways != 1 or self.train_ways != 1:
            raise DataError(f"{family.name} tasks are regressions with one output and no classes, but ways="
                            f"{self.ways}, train_ways={self.train_ways}: set ways=1 (bench: --ways 1).")
        for label in ("shots", "queries", "train_shots", "train_queries", "meta_batch", "eval_batch"):
            if getattr(self, label) < 1:
                raise DataError(f"{family.name}: {label} must be at least 1 (got {getattr(self, label)})")
        if getattr(self, "train_mode", "episodes") != "episodes":
            raise DataError(f"{family.name}: only train_mode='episodes' exists for regression tasks")

    @property
    def name(self) -> str:
        return self.family.name

    def task_arguments(self) -> dict:
        """A regression problem on ``in_features`` inputs, with MAML's 40-unit MLP."""
        return {"problem": "regression", "in_features": self.family.in_features, "hidden": MLP_WIDTH}

    def fixed_tasks(self, split: str, count: int) -> torch.Tensor:
        """``count`` evaluation tasks ``[count, shots + queries, d + 1]``, a pure function of the split and setting."""
        generator = seeded_generator(EVAL_SEEDS[split], self.shots, self.queries)
        x, y = self.family.sample(count, self.shots + self.queries, generator)
        return torch.cat([x, y], dim=-1)

    def training_points(self, draw: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Training meta-batch number ``draw``: ``[meta_batch, train_shots + train_queries, d + 1]`` on ``device``."""
        generator = device_generator(torch.device(device), self.seed, self.rank, draw)
        x, y = self.family.sample(self.meta_batch, self.train_shots + self.train_queries, generator)
        return torch.cat([x, y], dim=-1)

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if not self.episodes:
            self.episodes = {"val": self.fixed_tasks("val", self.val_episodes),
                             "test": self.fixed_tasks("test", self.test_episodes)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TrainDraws(self.meta_batch), batch_size=None)

    def _fixed_loader(self, split: str) -> DataLoader:
        dataset = FixedTasks(self.episodes[split], self.eval_batch, self.rank, self.world_size)
        return DataLoader(dataset, batch_size=None, shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> Episode:
        """Evaluation chunks are split as they come; training points are drawn here, on the batch's device."""
        if "points" in batch:
            return regression_episode(batch["points"], self.shots, batch["ids"])
        points = self.training_points(int(batch["draw"]), batch["draw"].device)
        return regression_episode(points, self.train_shots, batch["ids"])


class SinusoidDataModule(RegressionDataModule):
    """MAML's sinusoid regression (see module docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(Sinusoids(), **kwargs)


class LinearRegressionDataModule(RegressionDataModule):
    """Random linear functions on ``R^dim`` with optional Gaussian label ``noise`` (see module docstring)."""

    def __init__(self, dim: int = 5, noise: float = 0.0, **kwargs) -> None:
        if dim < 1 or noise < 0:
            raise DataError(f"linear: dim must be >= 1 and noise >= 0 (got dim={dim}, noise={noise})")
        super().__init__(LinearFunctions(dim, noise), **kwargs)
