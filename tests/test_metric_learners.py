"""Matching, Relation and Siamese networks, Baseline / Baseline++: losses on hand-made inputs, shapes on real
Omniglot episodes, and deterministic tiny runs through the real Lightning path."""
from __future__ import annotations

import math

import pytest
import torch

from bench.config import RunConfig
from bench.runner import run
from datamodules.batches import LabelledBatch
from datamodules.episodes import seeded_generator
from tasks.baseline import FINETUNE_SEED, Baseline, BaselinePlusPlus, cosine_logits
from tasks.matching import MatchingNet, cosine_attention
from tasks.relation import RelationNet
from tasks.siamese import Siamese, balanced_mean, contrastive_loss, nearest_support_scores

EPISODIC = {"matching": MatchingNet, "relation": RelationNet, "siamese": Siamese}


@pytest.fixture(scope="module")
def episodes(omniglot_vinyals):
    """A 4-task 5-way 1-shot training meta-batch and a 10-task test batch of real Omniglot episodes."""
    datamodule = omniglot_vinyals
    train = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    test = datamodule.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0)
    return train, test


def small(task_class, **kwargs):
    """A narrow (16-filter) network: the code paths of the full one at a fraction of the cost."""
    torch.manual_seed(0)
    return task_class(ways=5, in_channels=1, image_size=28, hidden=16, **kwargs)


# -- hand-made inputs ------------------------------------------------------------------------
def test_contrastive_loss_follows_the_label_convention_y1_different():
    squared = torch.tensor([0.25, 4.0, 0.25, 4.0])  # distances 0.5, 2, 0.5, 2
    different = torch.tensor([False, False, True, True])
    losses = contrastive_loss(squared, different, margin=1.0)
    # same class (y=0): d^2; different class (y=1): max(0, m - d)^2
    torch.testing.assert_close(losses, torch.tensor([0.25, 4.0, 0.25, 0.0]))
    torch.testing.assert_close(contrastive_loss(squared, different, margin=3.0), torch.tensor([0.25, 4.0, 6.25, 1.0]))
    # each kind weighs half, whatever the pair counts
    torch.testing.assert_close(balanced_mean(losses, different), torch.tensor(0.5 * (2.125 + 0.125)))
    with pytest.raises(ValueError, match="both same-class and different-class"):
        balanced_mean(losses, torch.ones(4, dtype=torch.bool))


def test_contrastive_gradient_is_finite_at_zero_distance():
    squared = torch.zeros(2, requires_grad=True)
    contrastive_loss(squared, torch.tensor([False, True]), margin=1.0).sum().backward()
    assert torch.isfinite(squared.grad).all()


def test_nearest_support_scores_pick_the_closest_example_of_each_class():
    squared = torch.tensor([[[4.0, 1.0, 9.0, 0.5]]])  # one query, four support examples
    support_y = torch.tensor([[0, 0, 1, 1]])
    scores = nearest_support_scores(squared, support_y, ways=2)
    torch.testing.assert_close(scores, torch.tensor([[[-1.0, -0.5]]]))


def test_cosine_attention_is_a_softmax_over_cosines():
    queries = torch.tensor([[[2.0, 0.0]]])
    support = torch.tensor([[[3.0, 0.0], [0.0, 5.0], [-1.0, 0.0]]])  # cosines 1, 0, -1
    attention = cosine_attention(queries, support)
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0)
    torch.testing.assert_close(attention[0, 0], expected)
    torch.testing.assert_close(cosine_attention(queries, support, scale=10.0)[0, 0],
                               torch.softmax(torch.tensor([10.0, 0.0, -10.0]), 0))


def test_baselinepp_cosine_logits_are_bounded_by_the_scale():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 20, 8, generator=generator) * 100
    weights = torch.randn(3, 5, 8, generator=generator)
    logits = cosine_logits(features, weights, scale=2.0)
    assert logits.shape == (3, 20, 5)
    assert logits.abs().max() <= 2.0 + 1e-5
    aligned = cosine_logits(weights[:, :1] * 7, weights, scale=2.0)  # a feature parallel to class 0's weight
    torch.testing.assert_close(aligned[:, 0, 0], torch.full((3,), 2.0))


# -- real episodes -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EPISODIC))
def test_episodic_learners_shapes_and_finite_loss(name, episodes):
    train, test = episodes
    task = small(EPISODIC[name])
    loss, outputs = task.training_loss(train)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert outputs.shape == (train.tasks, train.query_x.shape[1], 5)
    loss.backward()
    assert all(p.grad is not None for p in task.parameters() if p.requires_grad)
    task.eval()
    with torch.no_grad():
        assert task.predict(test).shape == (test.tasks, test.query_x.shape[1], 5)


@pytest.mark.parametrize("full_context", [False, True])
def test_matching_attention_sums_to_one_and_loss_is_nll(full_context, episodes):
    train, _ = episodes
    task = small(MatchingNet, full_context=full_context, read_steps=2)
    attention = task.attention(train)
    assert attention.shape == (4, 75, 5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(4, 75))
    loss, log_probabilities = task.training_loss(train)
    torch.testing.assert_close(log_probabilities.exp().sum(-1), torch.ones(4, 75))
    picked = log_probabilities.gather(-1, train.query_y.unsqueeze(-1))
    torch.testing.assert_close(loss, -picked.mean())


def test_relation_scores_in_unit_interval_and_classes_are_summed(omniglot_vinyals):
    datamodule = omniglot_vinyals
    indices = datamodule.samplers["train"].sample(2, torch.Generator().manual_seed(1))[:, :, :5]  # 5 examples a class
    episode = datamodule.gather(indices, torch.full((2,), -1), shots=3)  # 5-way 3-shot, 2 queries a class
    task = small(RelationNet).eval()
    captured = []
    task.relation.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    with torch.no_grad():
        scores = task.predict(episode)
        support = task.encoder(episode.support_x[1])  # [15, C, s, s], class c at rows 3c..3c+2
    assert scores.shape == (2, 10, 5) and scores.min() >= 0 and scores.max() <= 1
    pairs = captured[0].view(2, 10, 5, *captured[0].shape[1:])
    channels = support.shape[1]
    torch.testing.assert_close(pairs[1, 0, 2, :channels], support[6:9].sum(0))  # class 2 = SUM of its 3 shots
    task.train()
    loss, train_scores = task.training_loss(episode)
    target = torch.nn.functional.one_hot(episode.query_y, 5).float()
    torch.testing.assert_close(loss, (train_scores - target).pow(2).mean())
    ce_loss, _ = small(RelationNet, loss="ce").training_loss(episode)
    assert torch.isfinite(ce_loss)
    with pytest.raises(ValueError, match="'mse'"):
        small(RelationNet, loss="hinge")


def test_baseline_rejects_episodes_and_needs_train_classes(episodes):
    with pytest.raises(ValueError, match="train_classes"):
        small(Baseline)
    with pytest.raises(TypeError, match="train_mode='batches'"):
        small(Baseline, train_classes=10).training_loss(episodes[0])


@pytest.mark.parametrize("task_class", [Baseline, BaselinePlusPlus])
def test_baseline_pretrains_on_batches_and_fits_support_at_test_time(task_class, episodes):
    _, test = episodes
    task = small(task_class, train_classes=7, finetune_epochs=10)
    batch = LabelledBatch(torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 6]))
    loss, logits = task.training_loss(batch)
    assert logits.shape == (1, 6, 7) and torch.isfinite(loss)
    if task_class is BaselinePlusPlus:
        assert logits.abs().max() <= task.hparams.scale + 1e-5
    task.eval()
    with torch.no_grad():
        support = task.backbone(test.support_x.flatten(0, 1)).view(test.tasks, 5, -1)
        outputs = task.predict(test)
        generators = [seeded_generator(FINETUNE_SEED, int(i)) for i in test.ids.tolist()]
        before = task.initial_classifiers(generators, 5, support.shape[-1], support)
        fitted = task.fit_classifiers(support, test.support_y, test.ids, 5)
    assert outputs.shape == (test.tasks, 75, 5)

    def support_loss(parameters):
        logits = task.episode_logits(support, parameters[0], parameters[1] if len(parameters) > 1 else None)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), test.support_y.flatten())

    assert support_loss(fitted) < support_loss(before)
    # the per-episode classifier depends on the episode id only, not on its batch-mates
    alone = task.fit_classifiers(support[3:4], test.support_y[3:4], test.ids[3:4], 5)
    torch.testing.assert_close(alone[0][0], fitted[0][3])


# -- tiny runs through Lightning ---------------------------------------------------------------
def tiny_config(algorithm: str, shots: int = 1, **dataset_args) -> RunConfig:
    return RunConfig(algorithm=algorithm, ways=5, shots=shots, queries=3, meta_batch=2, eval_batch=4, steps=3,
                     val_every=3, val_episodes=4, test_episodes=8, seed=3, hparams={"hidden": 8},
                     dataset_args={"split": "vinyals", **dataset_args}, threads=1)


@pytest.mark.parametrize("algorithm, dataset_args", [
    ("matching", {}), ("relation", {}), ("siamese", {}),
    ("baselinepp", {"train_mode": "batches", "batch_size": 8}),
])
def test_tiny_run_is_deterministic(algorithm, dataset_args, tmp_path):
    first = run(tiny_config(algorithm, **dataset_args), tmp_path / "a", progress=False)
    second = run(tiny_config(algorithm, **dataset_args), tmp_path / "b", progress=False)
    assert first["status"] == "ok" and first["test"]["episodes"] == 8
    assert first["test"]["episode_scores"] == second["test"]["episode_scores"]
    assert all(0.0 <= score <= 1.0 for score in first["test"]["episode_scores"])
    assert math.isfinite(first["test"]["mean"])


def test_baseline_run_in_episode_mode_fails_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match="train_mode='batches'"):
        run(tiny_config("baseline"), tmp_path, progress=False)
