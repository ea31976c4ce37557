"""Correctness oracles: our meta-gradients against learn2learn and against hand computations.

MAML (second and first order), Meta-SGD and ANIL must give the meta-gradient of learn2learn's
``MAML`` / ``MetaSGD`` (ANIL: learn2learn's MAML wrapped around the head, features from the body) to
1e-5 in float64, on a tiny Conv-4 classifier (BatchNorm on batch statistics) and on a tiny
regression MLP, on both the loop path and the vmap path (``vectorize=True``; BatchNorm then runs as
primitive ops, see :func:`tasks.backbones.primitive_batch_norm`). Reptile's two outer steps must equal a
hand computation on quadratic losses (a linear model under MSE), and Meta-LSTM's meta-gradient must
reach every meta-learner parameter and follow the chain rule through its cell update.
"""
from __future__ import annotations

import copy

import learn2learn as l2l
import pytest
import pytorch_lightning as pl
import torch

from datamodules.episodes import Episode
from datamodules.sinusoid import LinearRegressionDataModule
from tasks.anil import ANIL
from tasks.maml import MAML
from tasks.metalstm import MetaLSTM
from tasks.metasgd import MetaSGD, _key
from tasks.reptile import Reptile

TASKS, WAYS, SHOTS, QUERIES = 3, 3, 2, 2


def tiny_episode(problem: str, seed: int = 0) -> Episode:
    generator = torch.Generator().manual_seed(seed)
    if problem == "classification":
        images = torch.rand(TASKS, WAYS, SHOTS + QUERIES, 1, 16, 16, generator=generator, dtype=torch.float64)
        return Episode.from_grouped(images, SHOTS, torch.arange(TASKS))
    x = torch.randn(TASKS, 2 * SHOTS + 2 * QUERIES, 2, generator=generator, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(x.shape[:2] + (1,), generator=generator,
                                                                dtype=torch.float64)
    split = 2 * SHOTS
    return Episode(x[:, :split], y[:, :split], x[:, split:], y[:, split:], torch.arange(TASKS), ways=1)


def tiny_task(cls: type[MAML], problem: str, vectorize: bool = False, **kwargs) -> MAML:
    torch.manual_seed(1)
    shape = dict(ways=WAYS, image_size=16, hidden=4) if problem == "classification" else dict(in_features=2, hidden=5)
    lr = 0.3 if problem == "classification" else 0.05
    return cls(problem=problem, inner_lr=lr, inner_steps=2, vectorize=vectorize, **shape, **kwargs).double()


def our_gradients(task: MAML, episode: Episode) -> dict[str, torch.Tensor]:
    task.zero_grad()
    loss, _ = task.training_loss(episode)
    loss.backward()
    return {name: p.grad.clone() for name, p in task.named_parameters()}


def reference_meta_loss(wrapped, episode: Episode, steps: int, loss_fn, features=None) -> torch.Tensor:
    """Mean query loss over the tasks after ``steps`` learn2learn adaptation steps on each support set."""
    features = features or (lambda x: x)
    total = 0.0
    for t in range(episode.tasks):
        learner = wrapped.clone()
        support = features(episode.support_x[t])
        for _ in range(steps):
            learner.adapt(loss_fn(learner(support), episode.support_y[t]))
        total = total + loss_fn(learner(features(episode.query_x[t])), episode.query_y[t])
    return total / episode.tasks


def assert_same(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == reference.keys()
    for name in ours:
        assert ours[name].abs().max() > 0, f"{name}: zero meta-gradient makes the comparison vacuous"
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)


PATHS = pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
PROBLEMS = pytest.mark.parametrize("problem", ["classification", "regression"])


def learn2learn_maml_backward(adapted: torch.nn.Module, task, episode: Episode, first_order: bool,
                              features: torch.nn.Module | None = None) -> None:
    """learn2learn's MAML meta-loss of ``adapted`` (on ``features`` of the images, if given), backpropagated."""
    wrapped = l2l.algorithms.MAML(adapted, lr=task.inner_lr, first_order=first_order)
    reference_meta_loss(wrapped, episode, task.inner_steps, task.loss_fn, features=features).backward()


@PATHS
@PROBLEMS
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_learn2learn(problem, vectorize, first_order):
    task = tiny_task(MAML, problem, vectorize, first_order=first_order)
    episode = tiny_episode(problem)
    reference = copy.deepcopy(task.network)
    learn2learn_maml_backward(reference, task, episode, first_order)
    assert_same(our_gradients(task, episode),
                {f"network.{name}": p.grad for name, p in reference.named_parameters()})


def test_first_and_second_order_differ():
    episode = tiny_episode("classification")
    second = our_gradients(tiny_task(MAML, "classification"), episode)
    first = our_gradients(tiny_task(MAML, "classification", first_order=True), episode)
    assert not torch.allclose(first["network.backbone.blocks.0.0.weight"],
                              second["network.backbone.blocks.0.0.weight"], atol=1e-6)


@PATHS
@PROBLEMS
def test_metasgd_meta_gradient_equals_learn2learn(problem, vectorize):
    task = tiny_task(MetaSGD, problem, vectorize)
    with torch.no_grad():  # distinct rates per coordinate, so a mix-up of parameters would show
        for rate in task.inner_lrs.values():
            rate.mul_(torch.empty_like(rate).uniform_(0.5, 1.5))
    episode = tiny_episode(problem)
    reference = copy.deepcopy(task.network)
    names = [name for name, _ in reference.named_parameters()]
    rates = [task.inner_lrs[_key(name)].detach().clone() for name in names]
    wrapped = l2l.algorithms.MetaSGD(reference, lrs=torch.nn.ParameterList(rates), first_order=False)
    reference_meta_loss(wrapped, episode, task.inner_steps, task.loss_fn).backward()
    expected = {f"network.{name}": p.grad for name, p in reference.named_parameters()}
    expected.update({f"inner_lrs.{_key(name)}": rate.grad for name, rate in zip(names, wrapped.lrs)})
    assert_same(our_gradients(task, episode), expected)


@PATHS
@PROBLEMS
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient_equals_learn2learn_head_maml_on_body_features(problem, vectorize, first_order):
    task = tiny_task(ANIL, problem, vectorize, first_order=first_order)
    episode = tiny_episode(problem)
    body, head = copy.deepcopy(task.network.backbone), copy.deepcopy(task.network.head)
    learn2learn_maml_backward(head, task, episode, first_order, features=body)
    expected = {f"network.backbone.{name}": p.grad for name, p in body.named_parameters()}
    expected.update({f"network.head.{name}": p.grad for name, p in head.named_parameters()})
    assert_same(our_gradients(task, episode), expected)


class LinearReptile(Reptile):
    """Reptile on a linear model, so every inner loss is a quadratic with a closed-form gradient."""

    def build_network(self) -> torch.nn.Module:
        return torch.nn.Linear(self.hparams.in_features, 1)


def test_reptile_outer_steps_equal_a_hand_computation_on_a_quadratic():
    dim, points, tasks, alpha, inner_steps, epsilon0, steps = 3, 8, 3, 0.05, 3, 0.8, 2
    data = LinearRegressionDataModule(dim=dim, shots=4, queries=4, meta_batch=tasks, val_episodes=0,
                                      test_episodes=0, seed=5)
    torch.manual_seed(0)
    task = LinearReptile(problem="regression", in_features=dim, inner_optimizer="sgd", inner_lr=alpha,
                         inner_steps=inner_steps, inner_batch=points, outer_step=epsilon0)
    theta = torch.cat([task.network.weight.detach().flatten(), task.network.bias.detach()]).double()
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, datamodule=data)

    for step in range(steps):  # by hand: full-batch gradient descent on 1/n ||X theta - y||^2, then interpolate
        batch = data.training_points(step).double()
        features = torch.cat([batch[..., :dim], torch.ones(tasks, points, 1, dtype=torch.float64)], dim=-1)
        targets = batch[..., dim]
        adapted = []
        for x, y in zip(features, targets):
            phi = theta.clone()
            for _ in range(inner_steps):
                phi = phi - alpha * 2 / points * x.T @ (x @ phi - y)
            adapted.append(phi)
        epsilon = epsilon0 * (1 - step / steps)
        theta = theta + epsilon * (torch.stack(adapted).mean(0) - theta)
    ours = torch.cat([task.network.weight.detach().flatten(), task.network.bias.detach()]).double()
    torch.testing.assert_close(ours, theta, rtol=1e-5, atol=1e-6)


def test_metalstm_meta_gradient_reaches_every_meta_learner_parameter():
    torch.manual_seed(0)
    task = MetaLSTM(ways=WAYS, image_size=16, hidden=4, inner_steps=3).double()
    loss, _ = task.training_loss(tiny_episode("classification"))
    loss.backward()
    for name, parameter in task.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_metalstm_input_gate_gradient_equals_the_chain_rule_through_one_update():
    """One update theta_1 = f * theta_0 - i * g with g a constant: dL/db_I = -sum(dL/dtheta_1 * g * i (1 - i))."""
    torch.manual_seed(0)
    task = MetaLSTM(ways=WAYS, image_size=16, hidden=4, inner_steps=1).double()
    episode = tiny_episode("classification")
    loss, _ = task.training_loss(episode)
    loss.backward()
    initial = torch.cat([p.detach().flatten() for p in task.network.parameters()]).expand(episode.tasks, -1)
    gradients, losses = task.learner_gradients(initial, episode)
    assert not gradients.requires_grad and not losses.requires_grad  # constants for the meta-learner
    with torch.no_grad():
        state = task.meta_learner.initial_state(initial.numel(), initial)
        updated, (_, _, _, input_gate) = task.meta_learner(initial, gradients, losses, state)
    updated = updated.clone().requires_grad_()
    outputs = torch.stack([task.learner(updated[t], episode.query_x[t]) for t in range(episode.tasks)])
    query_loss = task.loss_fn(outputs.flatten(0, 1), episode.query_y.flatten(0, 1))
    (at_updated,) = torch.autograd.grad(query_loss, updated)
    gate = input_gate.view_as(gradients)
    expected = -(at_updated * gradients * gate * (1 - gate)).sum()
    torch.testing.assert_close(task.meta_learner.input_gate.bias.grad, expected.reshape(1), rtol=1e-7, atol=1e-12)
