"""Episode sampling: shapes, validity, determinism, fixed evaluation episodes, device-side gather."""
from __future__ import annotations

import torch

from datamodules import OmniglotDataModule
from datamodules.episodes import EpisodeSampler, fixed_episodes, seeded_generator


def test_sampled_indices_form_valid_episodes():
    class_ids = torch.arange(10, 30)
    sampler = EpisodeSampler(class_ids, per_class=20, ways=5, shots=2, queries=3)
    indices = sampler.sample(64, seeded_generator(0))
    assert indices.shape == (64, 5, 5)
    classes, examples = indices // 20, indices % 20
    assert torch.all((classes == classes[..., :1]))                # one class per row
    assert all(len(set(row.tolist())) == 5 for row in classes[..., 0])  # distinct classes per episode
    assert set(classes.unique().tolist()) <= set(class_ids.tolist())
    assert all(len(set(r.tolist())) == 5 for r in examples.reshape(-1, 5))  # distinct examples per class


def test_same_seed_same_episodes_other_seed_other_episodes():
    sampler = EpisodeSampler(torch.arange(100), per_class=20, ways=5, shots=1, queries=15)
    first = sampler.sample(8, seeded_generator(3, 0))
    assert torch.equal(first, sampler.sample(8, seeded_generator(3, 0)))
    assert not torch.equal(first, sampler.sample(8, seeded_generator(4, 0)))
    assert not torch.equal(first, sampler.sample(8, seeded_generator(3, 1)))  # another rank


def test_fixed_evaluation_episodes_do_not_depend_on_run_seed_or_instance(omniglot_vinyals):
    other = OmniglotDataModule(split="vinyals", ways=5, shots=1, queries=15, meta_batch=4,
                               val_episodes=20, test_episodes=40, eval_batch=7, seed=123)
    other.setup()
    assert torch.equal(other.episodes["test"], omniglot_vinyals.episodes["test"])
    assert torch.equal(other.episodes["val"], omniglot_vinyals.episodes["val"])
    assert not torch.equal(other.episodes["val"][:20], omniglot_vinyals.episodes["test"][:20])
    # Test episodes only use test classes.
    test_classes = set(omniglot_vinyals.split_classes("test").tolist())
    assert set((other.episodes["test"] // 20).unique().tolist()) <= test_classes
    again = fixed_episodes(omniglot_vinyals.samplers["test"], 40, seed=2_000_003)
    assert torch.equal(again, omniglot_vinyals.episodes["test"])


def test_batches_are_indices_until_transfer_then_episodes(omniglot_vinyals):
    batch = next(iter(omniglot_vinyals.train_dataloader()))
    assert batch["indices"].dtype == torch.long and batch["indices"].shape == (4, 5, 16)
    episode = omniglot_vinyals.on_after_batch_transfer(batch, 0)
    assert episode.support_x.shape == (4, 5, 1, 28, 28) and episode.query_x.shape == (4, 75, 1, 28, 28)
    assert episode.support_y[0].tolist() == [0, 1, 2, 3, 4]
    assert episode.query_y[0].tolist() == sum(([c] * 15 for c in range(5)), [])
    flat = omniglot_vinyals.store.flat()
    expected = flat[batch["indices"][1, 2, 0]].float() / 255
    assert torch.equal(episode.support_x[1, 2], expected)
    assert torch.equal(episode.query_x[1, 2 * 15], flat[batch["indices"][1, 2, 1]].float() / 255)


def test_training_stream_is_deterministic_per_seed(omniglot_vinyals):
    def first_batches(datamodule, count=3):
        iterator = iter(datamodule.train_dataloader())
        return [next(iterator)["indices"] for _ in range(count)]

    same = OmniglotDataModule(split="vinyals", ways=5, shots=1, queries=15, meta_batch=4, seed=0)
    same.setup()
    for a, b in zip(first_batches(omniglot_vinyals), first_batches(same)):
        assert torch.equal(a, b)


def test_evaluation_loader_covers_every_episode_once(omniglot_vinyals):
    ids = torch.cat([batch["ids"] for batch in omniglot_vinyals.test_dataloader()])
    assert ids.tolist() == list(range(40))
