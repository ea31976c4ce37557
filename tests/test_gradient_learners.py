"""FOMAML, Meta-SGD, ANIL, Reptile, Meta-LSTM: constructor surface, mechanics, errors, tiny real runs.

The meta-gradients themselves are checked against learn2learn in tests/test_oracles.py.
"""
from __future__ import annotations

import inspect
import math
import platform

import pytest
import pytorch_lightning as pl
import torch
from torch.func import functional_call

from bench.allocator import requested_setting
from bench.config import RunConfig
from bench.runner import run
from datamodules.episodes import Episode
from datamodules.sinusoid import SinusoidDataModule
from tasks import algorithm_class
from tasks.anil import ANIL
from tasks.fomaml import FOMAML
from tasks.maml import MAML
from tasks.metalstm import MetaLSTM, preprocess
from tasks.metasgd import MetaSGD
from tasks.pretrained import Pretrained
from tasks.reptile import Reptile, minibatch_order


def tiny_episode(tasks=2, ways=3, shots=1, queries=2, size=16, seed=0) -> Episode:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(tasks, ways, shots + queries, 1, size, size, generator=generator)
    return Episode.from_grouped(images, shots, torch.arange(tasks))


TINY = dict(ways=3, image_size=16, hidden=4)


@pytest.mark.parametrize("name, cls", [("fomaml", FOMAML), ("metasgd", MetaSGD), ("anil", ANIL),
                                       ("reptile", Reptile), ("metalstm", MetaLSTM), ("pretrained", Pretrained)])
def test_registered(name, cls):
    assert algorithm_class(name) is cls


@pytest.mark.parametrize("cls", [MAML, FOMAML, MetaSGD, ANIL])
def test_shared_inner_loop_constructor_surface(cls):
    parameters = inspect.signature(cls.__init__).parameters
    assert {"inner_lr", "inner_steps", "test_inner_steps", "first_order"} <= set(parameters)
    task = cls(inner_lr=0.2, inner_steps=2, test_inner_steps=4, first_order=True, **TINY)
    assert (task.inner_lr, task.inner_steps, task.test_inner_steps, task.first_order) == (0.2, 2, 4, True)
    assert task.hparams.inner_lr == 0.2 and task.hparams.first_order is True


def test_fomaml_defaults_to_first_order_and_otherwise_equals_maml():
    assert FOMAML(**TINY).first_order is True and MAML(**TINY).first_order is False
    torch.manual_seed(0)
    fomaml = FOMAML(**TINY)
    maml = MAML(first_order=True, **TINY)
    maml.load_state_dict(fomaml.state_dict())
    episode = tiny_episode()
    torch.testing.assert_close(fomaml.training_loss(episode)[0], maml.training_loss(episode)[0])


def test_metasgd_has_one_learned_rate_per_coordinate_starting_at_inner_lr():
    task = MetaSGD(inner_lr=0.3, **TINY)
    rates = task.step_size()
    assert rates.keys() == dict(task.network.named_parameters()).keys()
    for name, parameter in task.network.named_parameters():
        assert rates[name].shape == parameter.shape and rates[name].requires_grad
        assert torch.all(rates[name] == 0.3)
    assert {id(rate) for rate in rates.values()} <= {id(p) for p in task.parameters()}  # meta-trained


def test_anil_adapts_only_the_head_and_runs_the_body_once_per_batch():
    task = ANIL(inner_steps=3, vectorize=False, **TINY)  # the loop's calls (vectorize="auto" would also time vmap)
    fast, frozen = task.split_parameters()
    assert set(fast) == {"head.weight", "head.bias"} and all(name.startswith("backbone.") for name in frozen)
    calls = []
    task.network.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    episode = tiny_episode(tasks=2)
    loss, outputs = task.training_loss(episode)
    assert outputs.shape == (2, 6, 3)
    assert calls == [3, 6, 3, 6]  # per task: support and query once each, whatever the inner steps
    loss.backward()
    assert task.network.backbone.blocks[0][0].weight.grad.abs().sum() > 0  # the body learns in the outer loop


def test_minibatch_order_makes_reshuffled_passes():
    torch.manual_seed(0)
    order = minibatch_order(examples=6, steps=4, batch=3, device=torch.device("cpu"))
    assert order.shape == (4, 3)
    assert sorted(order[:2].flatten().tolist()) == list(range(6)) == sorted(order[2:].flatten().tolist())
    assert minibatch_order(5, 2, 10, torch.device("cpu")).shape == (2, 5)  # a batch never exceeds the data
    assert minibatch_order(5, 0, 10, torch.device("cpu")).numel() == 0


def test_reptile_evaluation_fine_tunes_a_copy_and_keeps_no_graph():
    torch.manual_seed(0)
    task = Reptile(test_inner_steps=4, **TINY)
    before = [p.detach().clone() for p in task.parameters()]
    episode = tiny_episode()
    with torch.no_grad():
        outputs = task.predict(episode)
    assert outputs.shape == (2, 6, 3) and not outputs.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))
    assert all(p.grad is None for p in task.parameters())
    task.test_inner_steps = 0
    with torch.no_grad():
        assert not torch.allclose(task.predict(episode), outputs)


def one_adam_across_tasks(task: Reptile, tasks: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> dict:
    """The reference code's inner loop: one Adam for all tasks, the weights reset to theta before each."""
    theta = {name: value.detach().clone() for name, value in task.network.named_parameters()}
    params = {name: value.clone().requires_grad_() for name, value in theta.items()}
    optimizer = torch.optim.Adam(params.values(), lr=task.inner_lr, betas=(0.0, 0.999))
    for inputs, targets in tasks:
        with torch.no_grad():
            for name, value in params.items():
                value.copy_(theta[name])
        for _ in range(steps):  # full batches: the mini-batch order cannot matter
            optimizer.zero_grad()
            task.loss_fn(functional_call(task.network, params, (inputs,)), targets).backward()
            optimizer.step()
    return {name: value.detach() for name, value in params.items()}


def test_reptile_carried_inner_state_equals_one_adam_across_tasks_and_evaluation_leaves_it_alone():
    torch.manual_seed(0)
    fresh, carried = Reptile(**TINY), Reptile(inner_state="carried", **TINY)
    carried.load_state_dict(fresh.state_dict(), strict=False)
    episode = tiny_episode(shots=2)
    tasks = [(episode.support_x[t], episode.support_y[t]) for t in range(2)]
    size = tasks[0][0].shape[0]
    torch.manual_seed(1)  # the same mini-batch order
    first_fresh, _ = fresh.fine_tune(*tasks[0], steps=3, batch=size)
    torch.manual_seed(1)
    first_carried, _ = carried.fine_tune(*tasks[0], steps=3, batch=size, carry_state=True)
    assert all(torch.equal(first_fresh[name], first_carried[name]) for name in first_fresh)  # from a zero state
    assert float(carried.carried_state.step) == 3

    state = {key: value.clone() for key, value in carried.carried_state.state_dict().items()}
    with torch.no_grad():
        carried.predict(episode)  # evaluation starts from a copy and carries nothing on
    assert all(torch.equal(state[key], value) for key, value in carried.carried_state.state_dict().items())

    second_carried, _ = carried.fine_tune(*tasks[1], steps=3, batch=size, carry_state=True)
    second_fresh, _ = fresh.fine_tune(*tasks[1], steps=3, batch=size)
    reference = one_adam_across_tasks(fresh, tasks, steps=3)
    for name, value in reference.items():
        if not name.endswith(".0.bias"):  # a conv bias feeding BatchNorm has a float-noise gradient, which
            torch.testing.assert_close(second_carried[name], value)  # Adam scales up to ~lr either way
    assert not all(torch.allclose(second_fresh[name], second_carried[name]) for name in reference)
    assert float(carried.carried_state.step) == 6
    assert any(key.startswith("carried_state.exp_avg_sq_") for key in carried.state_dict())  # checkpointed


def test_reptile_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown inner_optimizer 'rmsprop'"):
        Reptile(inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="inner_batch"):
        Reptile(inner_batch=0)
    with pytest.raises(ValueError, match="unknown inner_state 'shared'"):
        Reptile(inner_state="shared")
    with pytest.raises(ValueError, match="use inner_optimizer='adam'"):
        Reptile(inner_optimizer="sgd", inner_state="carried")
    trainer = pl.Trainer(max_steps=-1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    data = SinusoidDataModule(shots=2, queries=2, meta_batch=2, val_episodes=0, test_episodes=0)
    with pytest.raises(ValueError, match="max_steps"):
        trainer.fit(Reptile(problem="regression", hidden=4), datamodule=data)


def test_metalstm_preprocessing_is_log_sign_above_the_threshold_and_linear_below():
    values = torch.tensor([2.0, -1e-3, 1e-6, -1e-7, 0.0])
    out = preprocess(values)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out[0], torch.tensor([math.log(2.0) / 10, 1.0]))
    torch.testing.assert_close(out[1], torch.tensor([math.log(1e-3) / 10, -1.0]))
    torch.testing.assert_close(out[2:], torch.tensor([[-1.0, 1e-6 * math.exp(10)], [-1.0, -1e-7 * math.exp(10)],
                                                      [-1.0, 0.0]]))


def test_metalstm_starts_as_small_step_gradient_descent():
    """Initial gates: forget ~ 1 (bias in [4, 6]) and input ~ sigmoid([-5, -4]), so theta_1 ~ theta_0 - small * g."""
    torch.manual_seed(0)
    task = MetaLSTM(inner_steps=1, **TINY)
    episode = tiny_episode()
    initial = torch.cat([p.detach().flatten() for p in task.network.parameters()]).expand(episode.tasks, -1)
    gradients, losses = task.learner_gradients(initial, episode)
    with torch.no_grad():
        updated, (_, _, forget, learn) = task.meta_learner(
            initial, gradients, losses, task.meta_learner.initial_state(initial.numel(), initial))
    assert forget.min() > 0.98 and torch.sigmoid(torch.tensor(-5.5)) < learn.min() <= learn.max() < 0.03
    step = (initial - updated) / gradients.where(gradients.abs() > 1e-6, torch.ones_like(gradients))
    assert step[gradients.abs() > 1e-3].median() > 0  # the update goes down the gradient


def test_metalstm_evaluation_keeps_no_graph():
    task = MetaLSTM(inner_steps=2, **TINY)
    with torch.no_grad():
        outputs = task.predict(tiny_episode())
    assert outputs.shape == (2, 6, 3) and not outputs.requires_grad


def test_pretrained_refuses_classification():
    with pytest.raises(ValueError, match="regression data set"):
        Pretrained(problem="classification")


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
OMNIGLOT = dict(dataset="omniglot", ways=5, shots=1, queries=3, meta_batch=2, eval_batch=10, steps=3, val_every=3,
                val_episodes=10, test_episodes=20, seed=3, threads=1)


@pytest.mark.parametrize("algorithm, hparams", [
    ("fomaml", {"hidden": 8}), ("metasgd", {"hidden": 8}), ("anil", {"hidden": 8}),
    ("reptile", {"hidden": 8, "test_inner_steps": 3}), ("metalstm", {"hidden": 4, "inner_steps": 2}),
])
def test_tiny_omniglot_run_is_recorded_and_deterministic(tmp_path, algorithm, hparams):
    config = RunConfig(algorithm=algorithm, hparams=hparams, **OMNIGLOT)
    record = run(config, tmp_path / "a", progress=False)
    assert record["status"] == "ok" and record["metric"] == "acc" and record["train"]["steps"] == 3
    assert record["allocator"] == ("retain" if GLIBC and requested_setting() == "retain" else "default")
    assert record["test"]["episodes"] == 20 and 0 <= record["test"]["mean"] <= 1
    if algorithm in ("reptile", "metalstm"):  # manual optimisation / unrolled updates: same seed, same result
        again = run(config, tmp_path / "b", progress=False)
        assert again["test"]["episode_scores"] == record["test"]["episode_scores"]
