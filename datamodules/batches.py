"""Ordinary supervised mini-batches over all training classes (``train_mode="batches"``).

Transfer learners such as Baseline / Baseline++ (Chen et al. 2019, "A Closer Look at Few-shot
Classification") pre-train a classifier over every training class with plain mini-batches instead of
episodes. Like episodes, a batch travels as indices: the stream yields flat store indices ``[B]`` and
labels ``[B]`` (the position of each image's class in the training split, ``0..train_classes-1``),
and the pixels are gathered on the device after the batch transfer. Validation and test are
untouched: they stay the fixed episodes every algorithm is scored on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import IterableDataset

from datamodules.download import DataError
from datamodules.episodes import seeded_generator

TRAIN_MODES = ("episodes", "batches")
# Mixed into the seed so the batch stream never coincides with the episode stream of the same seed.
BATCH_STREAM = 0xBA7C4


@dataclass
class LabelledBatch:
    """A supervised mini-batch on the training device: ``images [B, C, H, W]``, ``labels [B]``.

    :class:`tasks.base.EpisodicTask` logs a training score against ``query_y`` per ``tasks``; a batch
    reads as one task whose queries are all its images, so the shared training step needs no branch.
    """

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def tasks(self) -> int:
        return 1

    @property
    def query_y(self) -> torch.Tensor:
        return self.labels.unsqueeze(0)


class TrainBatches(IterableDataset):
    """An endless stream of shuffled epochs over every image of the training classes.

    Each epoch is a seeded permutation of all ``len(class_ids) * per_class`` training images, cut into
    batches of ``batch_size`` (the last, incomplete batch of an epoch is dropped). Yields
    ``{"indices": [B] flat store indices, "labels": [B] class positions in class_ids}``. Under DDP each
    rank draws its own permutations (seeded by rank), as the episode stream does.
    """

    def __init__(self, class_ids: torch.Tensor, per_class: int, batch_size: int, seed: int, rank: int = 0) -> None:
        total = class_ids.numel() * per_class
        if not 1 <= batch_size <= total:
            raise DataError(f"batch_size must be between 1 and the {total} training images (got {batch_size})")
        self.class_ids, self.per_class, self.batch_size = class_ids.long(), per_class, batch_size
        self.seed, self.rank = seed, rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = seeded_generator(self.seed, self.rank, BATCH_STREAM)
        total = self.class_ids.numel() * self.per_class
        while True:
            order = torch.randperm(total, generator=generator)
            for start in range(0, total - self.batch_size + 1, self.batch_size):
                picked = order[start:start + self.batch_size]
                labels = picked // self.per_class
                indices = self.class_ids[labels] * self.per_class + picked % self.per_class
                yield {"indices": indices, "labels": labels}


def check_train_mode(train_mode: str) -> None:
    """Raise a :class:`DataError` naming the valid modes unless ``train_mode`` is one of them."""
    if train_mode not in TRAIN_MODES:
        raise DataError(f"unknown train_mode {train_mode!r}: use 'episodes' (meta-learners) or "
                        "'batches' (supervised pre-training over all training classes, e.g. Baseline)")
