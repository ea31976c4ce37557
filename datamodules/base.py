"""EpisodicDataModule: the one data path every image dataset shares.

Subclasses only say how to build the uint8 store and which store classes belong to each split. This
base class checks the request against the split, samples training meta-batches as index tensors
(seeded from the global seed and the rank), fixes the validation/test episodes from a seed that does
not depend on the run, and gathers pixels on the device after the batch transfer.
"""
from __future__ import annotations

from typing import Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.batches import LabelledBatch, TrainBatches, check_train_mode
from datamodules.download import DataError
from datamodules.episodes import Episode, EpisodeSampler, fixed_episodes, seeded_generator, support_then_query
from datamodules.store import ImageStore

EVAL_SEEDS = {"val": 1_000_003, "test": 2_000_003}
AUGMENT_STREAM = 0xA06  # mixed into the seed: augmentation draws never coincide with episode draws


class TrainEpisodes(IterableDataset):
    """An endless stream of training meta-batches ``{"indices": [tasks, ways, shots+queries]}``."""

    def __init__(self, sampler: EpisodeSampler, tasks: int, seed: int, rank: int) -> None:
        self.sampler, self.tasks, self.seed, self.rank = sampler, tasks, seed, rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = seeded_generator(self.seed, self.rank)
        ids = torch.full((self.tasks,), -1, dtype=torch.long)
        while True:
            yield {"indices": self.sampler.sample(self.tasks, generator), "ids": ids}


class FixedEpisodes(IterableDataset):
    """Fixed evaluation episodes served in chunks of ``tasks``; a rank sees only its own chunks (``rank::world_size``).

    Iterable and without a length on purpose: Lightning then never adds a DistributedSampler (which
    would shard the chunks a second time, whatever the Trainer's ``use_distributed_sampler``), and a
    rank left without a chunk (fewer chunks than ranks) still reaches the epoch end, where the scores
    of all ranks are gathered, instead of failing Lightning's zero-length check.
    """

    def __init__(self, episodes: torch.Tensor, tasks: int, rank: int = 0, world_size: int = 1) -> None:
        ids = torch.arange(episodes.shape[0])
        chunks = list(zip(episodes.split(tasks), ids.split(tasks)))
        self.chunks = chunks[rank::world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[index] for index in range(len(self.chunks)))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        indices, ids = self.chunks[index]
        return {"indices": indices, "ids": ids}


class EpisodicDataModule(pl.LightningDataModule):
    """N-way K-shot episodes from an :class:`ImageStore`.

    Args:
        ways, shots, queries: the evaluation setting (queries per class).
        train_ways, train_shots, train_queries: the training setting (default: the evaluation one;
            e.g. Prototypical Networks train with more ways than they test on).
        meta_batch: episodes per training step. eval_batch: episodes per validation/test step.
        val_episodes, test_episodes: number of fixed evaluation episodes.
        seed: seeds the training episodes (the evaluation episodes never depend on it).
        train_mode: ``"episodes"``, or ``"batches"``: ordinary mini-batches of ``batch_size`` images over
            all training classes (supervised pre-training, see :mod:`datamodules.batches`).
    """

    splits = ("train", "val", "test")

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        train_ways: int | None = None,
        train_shots: int | None = None,
        train_queries: int | None = None,
        meta_batch: int = 32,
        eval_batch: int = 50,
        val_episodes: int = 100,
        test_episodes: int = 1000,
        seed: int = 0,
        train_mode: str = "episodes",
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.ways, self.shots, self.queries = ways, shots, queries
        self.train_ways = train_ways or ways
        self.train_shots = train_shots or shots
        self.train_queries = train_queries or queries
        self.meta_batch, self.eval_batch = meta_batch, eval_batch
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.seed = seed
        check_train_mode(train_mode)
        self.train_mode, self.batch_size = train_mode, batch_size
        self.store: ImageStore | None = None
        self.samplers: dict[str, EpisodeSampler] = {}
        self.episodes: dict[str, torch.Tensor] = {}
        self.rank, self.world_size = 0, 1
        self._augment_generator: torch.Generator | None = None

    # -- what a dataset provides -------------------------------------------------------------
    @property
    def name(self) -> str:
        raise NotImplementedError

    def build_store(self) -> ImageStore:
        """Decode (or load from cache) every image this dataset uses."""
        raise NotImplementedError

    def split_classes(self, split: str) -> torch.Tensor:
        """Store class ids that make up ``split`` ("train", "val" or "test")."""
        raise NotImplementedError

    def eval_sampler(self, split: str, class_ids: torch.Tensor) -> EpisodeSampler:
        """The sampler of the fixed evaluation episodes (datasets may restrict it, e.g. alphabets)."""
        return EpisodeSampler(class_ids, self.store.per_class, self.ways, self.shots, self.queries)

    def train_sampler(self, class_ids: torch.Tensor, ways: int, shots: int, queries: int) -> EpisodeSampler:
        """The sampler of the training episodes (datasets may restrict it, e.g. to one alphabet per episode)."""
        return EpisodeSampler(class_ids, self.store.per_class, ways, shots, queries)

    def task_arguments(self) -> dict:
        """Constructor arguments an algorithm may take from the data (input channels, image size, number of training classes)."""
        channels, height, _ = self.store.image_shape
        return {"in_channels": channels, "image_size": height,
                "train_classes": self.samplers["train"].class_ids.numel()}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Device-side transform of gathered images in [0, 1] (identity by default); may work in place, as
        ``images`` is always a freshly gathered tensor."""
        return images

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Device-side random augmentation of gathered training images in [0, 1], before ``normalize`` (none by default)."""
        return images

    def augment_generator(self) -> torch.Generator:
        """The CPU generator of the augmentation draws, seeded from ``seed`` and the rank on first use
        (the first training batch, when the rank is known)."""
        if self._augment_generator is None:
            self._augment_generator = seeded_generator(self.seed, self.rank, AUGMENT_STREAM)
        return self._augment_generator

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.store is not None:
            return
        for label, value in (("ways", self.ways), ("shots", self.shots), ("queries", self.queries),
                             ("meta_batch", self.meta_batch), ("eval_batch", self.eval_batch)):
            if value < 1:
                raise DataError(f"{label} must be at least 1 (got {value})")
        self.store = self.build_store()
        settings = {
            "train": (self.train_ways, self.train_shots, self.train_queries),
            "val": (self.ways, self.shots, self.queries),
            "test": (self.ways, self.shots, self.queries),
        }
        for split in self.splits:
            class_ids = self.split_classes(split)
            ways, shots, queries = settings[split]
            self._check_request(split, class_ids, ways, shots, queries)
            if split == "train":
                self.samplers[split] = self.train_sampler(class_ids, ways, shots, queries)
            else:
                self.samplers[split] = self.eval_sampler(split, class_ids)
                count = self.val_episodes if split == "val" else self.test_episodes
                self.episodes[split] = fixed_episodes(self.samplers[split], count, EVAL_SEEDS[split])

    def _check_request(self, split: str, class_ids: torch.Tensor, ways: int, shots: int, queries: int) -> None:
        per_class = self.store.per_class
        if shots + queries > per_class:
            raise DataError(
                f"{self.name} {split}: shots + queries = {shots} + {queries} = {shots + queries} but each "
                f"class has only {per_class} images. Lower shots or queries so that shots + queries <= {per_class}."
            )
        if ways > class_ids.numel():
            raise DataError(
                f"{self.name} {split}: {ways}-way episodes need {ways} classes but the split has "
                f"{class_ids.numel()}. Use ways <= {class_ids.numel()}."
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_mode == "batches":
            train = self.samplers["train"]
            return DataLoader(TrainBatches(train.class_ids, train.per_class, self.batch_size, self.seed, self.rank),
                              batch_size=None)
        dataset = TrainEpisodes(self.samplers["train"], self.meta_batch, self.seed, self.rank)
        return DataLoader(dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")

    def _fixed_loader(self, split: str) -> DataLoader:
        dataset = FixedEpisodes(self.episodes[split], self.eval_batch, self.rank, self.world_size)
        return DataLoader(dataset, batch_size=None, shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> Episode | LabelledBatch:
        """Gather the pixels of the episode (or supervised batch) indices on the device the batch was moved to."""
        if "labels" in batch:
            return LabelledBatch(self.normalize(self.augment(self.store.gather(batch["indices"]))), batch["labels"])
        training = bool((batch["ids"] < 0).all())
        return self.gather(batch["indices"], batch["ids"], self.train_shots if training else self.shots, training)

    def gather(self, indices: torch.Tensor, ids: torch.Tensor, shots: int, training: bool = False) -> Episode:
        """The :class:`Episode` of flat ``indices`` ``[tasks, ways, shots + queries]``, on their device.

        Training episodes are augmented (see :meth:`augment`); evaluation episodes never are.
        """
        tasks, ways = indices.shape[:2]
        images = self.store.gather(support_then_query(indices, shots))  # pixels written once, no re-slicing copies
        if training:
            images = self.augment(images)
        return Episode.from_support_then_query(self.normalize(images), tasks, ways, shots, ids)
