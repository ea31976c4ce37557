"""Supervised mini-batch mode of the data module (train_mode="batches"): labels, coverage, determinism."""
from __future__ import annotations

import itertools

import pytest
import torch

from datamodules import OmniglotDataModule
from datamodules.batches import LabelledBatch, TrainBatches
from datamodules.download import DataError
from datamodules.episodes import Episode


def test_batches_cover_exactly_the_training_classes_with_valid_labels():
    class_ids = torch.tensor([7, 2, 11, 5])
    stream = TrainBatches(class_ids, per_class=3, batch_size=5, seed=0)
    batches = list(itertools.islice(iter(stream), 2))  # one epoch: 12 images -> 2 full batches, 2 dropped
    indices = torch.cat([b["indices"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert all(b["indices"].shape == (5,) for b in batches)
    assert labels.min() >= 0 and labels.max() < 4
    torch.testing.assert_close(class_ids[labels], indices // 3)  # a label is its image's class position
    assert indices.unique().numel() == 10  # without replacement within an epoch
    assert set((indices // 3).tolist()) <= set(class_ids.tolist())


def test_batches_are_seeded():
    def first(seed):
        return next(iter(TrainBatches(torch.arange(50), per_class=20, batch_size=16, seed=seed)))["indices"]

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_batch_size_and_mode_are_checked():
    with pytest.raises(DataError, match="batch_size"):
        TrainBatches(torch.arange(2), per_class=3, batch_size=7, seed=0)
    with pytest.raises(DataError, match="'batches'"):
        OmniglotDataModule(train_mode="supervised")


def test_datamodule_batch_mode_trains_on_batches_and_evaluates_on_episodes():
    datamodule = OmniglotDataModule(split="vinyals", ways=5, shots=1, queries=5, val_episodes=4, test_episodes=4,
                                    eval_batch=2, train_mode="batches", batch_size=64, seed=0)
    datamodule.setup("fit")
    train_classes = datamodule.task_arguments()["train_classes"]
    assert train_classes == 4112
    stream = iter(datamodule.train_dataloader())
    batch = datamodule.on_after_batch_transfer(next(stream), 0)
    assert isinstance(batch, LabelledBatch)
    assert batch.images.shape == (64, 1, 28, 28) and batch.images.dtype == torch.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    labels = torch.cat([batch.labels] + [next(stream)["labels"] for _ in range(200)])
    assert labels.min() >= 0 and labels.max() < train_classes
    assert labels.unique().numel() > 0.9 * train_classes  # 12,864 draws reach nearly every class
    test_classes = set(datamodule.split_classes("test").tolist())
    raw = next(stream)
    assert not test_classes & set((raw["indices"] // datamodule.store.per_class).tolist())
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert isinstance(datamodule.on_after_batch_transfer(next(iter(loader)), 0), Episode)
