"""Regression episodes (sinusoid, linear): shapes, ranges, seeding, errors, and real MAML / baseline runs."""
from __future__ import annotations

import math

import pytest
import torch

from bench.config import RunConfig
from bench.runner import run
from datamodules import DataError, datamodule_class
from datamodules.sinusoid import LinearRegressionDataModule, SinusoidDataModule


def sinusoid(**overrides) -> SinusoidDataModule:
    settings = dict(shots=10, queries=15, meta_batch=25, eval_batch=20, val_episodes=30, test_episodes=50, seed=0)
    data = SinusoidDataModule(**{**settings, **overrides})
    data.setup("fit")
    return data


def first_training_episode(data):
    return data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)


def test_registered():
    assert datamodule_class("sinusoid") is SinusoidDataModule
    assert datamodule_class("linear") is LinearRegressionDataModule


def test_training_episode_shapes_and_the_papers_ranges():
    data = sinusoid(train_shots=5, train_queries=7)
    episode = first_training_episode(data)
    assert episode.support_x.shape == (25, 5, 1) and episode.support_y.shape == (25, 5, 1)
    assert episode.query_x.shape == (25, 7, 1) and episode.query_y.shape == (25, 7, 1)
    assert episode.support_y.dtype == torch.float32 and episode.ways == 1 and episode.shots == 5
    assert torch.all(episode.ids == -1)
    x = torch.cat([episode.support_x, episode.query_x], 1)
    y = torch.cat([episode.support_y, episode.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5 and y.abs().max() <= 5
    # Each task is one sinusoid A sin(x - phi): y = a sin x + b cos x with a = A cos phi, b = -A sin phi.
    basis = torch.cat([torch.sin(x), torch.cos(x)], -1)
    coefficients = torch.linalg.lstsq(basis, y).solution
    torch.testing.assert_close(basis @ coefficients, y, atol=1e-4, rtol=0)
    amplitude = coefficients.norm(dim=1).squeeze(-1)
    phase = torch.atan2(-coefficients[:, 1, 0], coefficients[:, 0, 0])
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4


def test_linear_tasks_are_linear_functions_of_their_inputs():
    data = LinearRegressionDataModule(dim=3, shots=6, queries=4, meta_batch=8, val_episodes=0, test_episodes=5)
    data.setup("fit")
    episode = first_training_episode(data)
    assert episode.support_x.shape == (8, 6, 3) and episode.query_y.shape == (8, 4, 1)
    weights = torch.linalg.lstsq(episode.support_x, episode.support_y).solution  # [8, 3, 1]
    torch.testing.assert_close(episode.query_x @ weights, episode.query_y, atol=1e-4, rtol=1e-4)
    assert data.task_arguments() == {"problem": "regression", "in_features": 3, "hidden": 40}


def test_same_seed_same_episodes_other_seed_or_rank_other_episodes():
    a, b, c = sinusoid(seed=4), sinusoid(seed=4), sinusoid(seed=5)
    torch.testing.assert_close(a.training_points(3), b.training_points(3), rtol=0, atol=0)
    assert not torch.equal(a.training_points(3), a.training_points(4))
    assert not torch.equal(a.training_points(3), c.training_points(3))
    b.rank = 1
    assert not torch.equal(a.training_points(3), b.training_points(3))
    # The loader path gives draw 0, 1, ... of the same stream.
    loader = iter(a.train_dataloader())
    for draw in range(2):
        episode = a.on_after_batch_transfer(next(loader), 0)
        torch.testing.assert_close(episode.support_x, a.training_points(draw)[:, :10, :1], rtol=0, atol=0)


def test_evaluation_tasks_are_fixed_independently_of_the_run_seed_and_batch_size():
    a, b = sinusoid(seed=0), sinusoid(seed=99, eval_batch=7)
    for split in ("val", "test"):
        torch.testing.assert_close(a.episodes[split], b.episodes[split][: len(a.episodes[split])], rtol=0, atol=0)
    assert not torch.equal(a.episodes["val"][:30], a.episodes["test"][:30])
    chunks = [b.on_after_batch_transfer(batch, 0) for batch in b.test_dataloader()]
    assert [len(chunk.ids) for chunk in chunks] == [7] * 7 + [1]
    assert torch.cat([chunk.ids for chunk in chunks]).tolist() == list(range(50))
    torch.testing.assert_close(torch.cat([chunk.query_y for chunk in chunks]), b.episodes["test"][:, 10:, 1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_episodes_are_made_on_the_batch_device():
    data = sinusoid()
    batch = {key: value.cuda() for key, value in next(iter(data.train_dataloader())).items()}
    episode = data.on_after_batch_transfer(batch, 0)
    assert episode.support_x.is_cuda and episode.query_y.is_cuda


@pytest.mark.parametrize("settings, message", [
    (dict(ways=5), "set ways=1"), (dict(shots=0), "shots must be at least 1"),
    (dict(meta_batch=0), "meta_batch must be at least 1"),
])
def test_bad_settings_raise_one_clear_error(settings, message):
    with pytest.raises(DataError, match=message):
        SinusoidDataModule(**settings)
    with pytest.raises(DataError, match="dim must be >= 1"):
        LinearRegressionDataModule(dim=0)


SINUSOID = dict(dataset="sinusoid", ways=1, shots=10, queries=10, meta_batch=10, eval_batch=50, val_episodes=0,
                test_episodes=100, seed=1, threads=1)


def test_maml_learns_sinusoids_and_the_record_is_deterministic(tmp_path):
    hparams = {"inner_lr": 0.01, "test_inner_steps": 1, "lr": 3e-3, "vectorize": True}  # no BatchNorm: vmap is exact
    untrained = run(RunConfig(algorithm="maml", hparams=hparams, steps=1, **SINUSOID), tmp_path, progress=False)
    record = run(RunConfig(algorithm="maml", hparams=hparams, steps=200, **SINUSOID), tmp_path, progress=False)
    assert record["status"] == "ok" and record["metric"] == "mse" and record["test"]["episodes"] == 100
    assert record["test"]["mean"] < 0.75 * untrained["test"]["mean"]
    config = RunConfig(algorithm="maml", hparams=hparams, steps=10, **SINUSOID)
    first, again = (run(config, tmp_path / folder, progress=False) for folder in "ab")
    assert again["test"]["episode_scores"] == first["test"]["episode_scores"]


def test_pretrained_baseline_runs_on_linear_tasks(tmp_path):
    config = RunConfig(algorithm="pretrained", hparams={"test_inner_steps": 2},
                       **{**SINUSOID, "dataset": "linear", "steps": 5})
    record = run(config, tmp_path, progress=False)
    assert record["status"] == "ok" and record["metric"] == "mse" and record["test"]["mean"] > 0
