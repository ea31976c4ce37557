"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For every task of a meta-batch, start from the shared initialisation ``theta`` and take ``inner_steps``
steps of an ordinary optimiser on mini-batches of the task's examples, reaching ``phi_i``; then move
the initialisation towards the tasks' solutions, ``theta <- theta + epsilon * (mean_i phi_i - theta)``,
with ``epsilon`` annealed linearly from ``outer_step`` to 0 over the run. No second derivatives and no
support/query split in training: all examples of a training episode (support and query) are the
task's data. Evaluation fine-tunes on the support set with the same inner optimiser and predicts the
query set (in one batch, so BatchNorm's batch statistics make it transductive, like MAML's).

Defaults are the paper's Omniglot hyper-parameters (appendix, "Reptile hyper-parameters" table):
Adam with ``beta1 = 0`` and learning rate 1e-3 in the inner loop, 5 inner iterations on mini-batches
of 10, outer step size 1.0 annealed to 0, 50 evaluation iterations on mini-batches of 5; the paper's
meta-batch of 5 tasks is the data module's ``meta_batch`` (bench's default for Reptile). The paper's
training episodes have 10 shots; with ``--shots 1 --queries 15`` a training task has 80 examples,
of which the 5 inner mini-batches of 10 use 50.

The inner Adam's state: by default (``inner_state="fresh"``) every task starts with a fresh optimiser, so
tasks do not depend on each other. With beta1 = 0, a fresh Adam's first step moves every weight by about
``inner_lr`` whatever its gradient's size (``g / sqrt(g^2)``). The paper's reference code instead keeps one
Adam optimiser for the whole run: its second-moment estimates and step count carry over from task to task,
and every evaluation task starts from (a copy of) the state training ended with. ``inner_state="carried"``
does the same, so each weight's step is scaled by its gradient's running size over many tasks. (Under DDP
each process carries its own state.)
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch.func import functional_call

from datamodules.episodes import Episode
from tasks.base import EpisodicTask
from tasks.inner_loop import Params
from tasks.maml import learner_network

INNER_OPTIMIZERS = ("adam", "sgd")
INNER_STATES = ("fresh", "carried")


def minibatch_order(examples: int, steps: int, batch: int, device: torch.device) -> torch.Tensor:
    """``[steps, batch]`` example indices: consecutive mini-batches of reshuffled passes over the examples."""
    batch = min(batch, examples)
    passes = math.ceil(steps * batch / examples) if steps else 0
    order = [torch.randperm(examples, device=device) for _ in range(passes)]
    return torch.cat(order)[: steps * batch].view(steps, batch) if order else torch.empty(0, batch, dtype=torch.long)


class CarriedAdamState(torch.nn.Module):
    """The inner Adam's state that ``inner_state="carried"`` keeps from task to task: per weight, the
    second-moment estimate, and one step count. With beta1 = 0 the first moment is just the current
    gradient, so nothing else needs carrying. Buffers, so the state follows the module's device and checkpoint."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        for name, value in network.named_parameters():
            self.register_buffer(self.buffer_name(name), torch.zeros_like(value))
        self.register_buffer("step", torch.zeros(()))

    @staticmethod
    def buffer_name(parameter: str) -> str:
        return "exp_avg_sq_" + parameter.replace(".", "_")

    def load_into(self, optimizer: torch.optim.Adam, params: Params) -> None:
        """Start ``optimizer`` (over ``params``, named as the network's) from a copy of the carried state."""
        step = torch.tensor(float(self.step))  # Adam keeps a non-capturable step count on the CPU
        for name, value in params.items():
            optimizer.state[value] = {"step": step.clone(), "exp_avg": torch.zeros_like(value),
                                      "exp_avg_sq": getattr(self, self.buffer_name(name)).clone()}

    def save_from(self, optimizer: torch.optim.Adam, params: Params) -> None:
        """Carry ``optimizer``'s state after a training task on to the next one."""
        for name, value in params.items():
            getattr(self, self.buffer_name(name)).copy_(optimizer.state[value]["exp_avg_sq"])
        self.step.fill_(float(optimizer.state[value]["step"]))  # one count: every weight steps together


class Reptile(EpisodicTask):
    """Reptile with manual optimisation (see module docstring).

    Args:
        inner_optimizer: ``"adam"`` (beta1 = 0, as in the paper) or ``"sgd"``; inner_lr its learning rate.
        inner_state: ``"fresh"`` Adam state for every task, or ``"carried"`` across tasks as in the
            reference code (see module docstring).
        inner_steps, inner_batch: inner iterations per training task and their mini-batch size.
        test_inner_steps, test_inner_batch: the same for fine-tuning on an evaluation support set.
        outer_step: the interpolation step epsilon at the start of the run.
        anneal: decay epsilon linearly to 0 over the Trainer's ``max_steps``.
    """

    default_meta_batch: ClassVar[int] = 5  # the paper's meta-batch (hyper-parameter table)

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 in_features: int = 1, problem: str = "classification", inner_optimizer: str = "adam",
                 inner_state: str = "fresh", inner_lr: float = 1e-3, inner_steps: int = 5, inner_batch: int = 10,
                 test_inner_steps: int = 50, test_inner_batch: int = 5, outer_step: float = 1.0,
                 anneal: bool = True) -> None:
        super().__init__(ways=ways, problem=problem, lr=outer_step)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner_optimizer {inner_optimizer!r}: use one of {INNER_OPTIMIZERS}")
        if inner_state not in INNER_STATES:
            raise ValueError(f"unknown inner_state {inner_state!r}: use one of {INNER_STATES}")
        if inner_state == "carried" and inner_optimizer != "adam":
            raise ValueError("inner_state='carried' carries Adam's state; plain SGD has none: "
                             "use inner_optimizer='adam' or inner_state='fresh'")
        if min(inner_steps, test_inner_steps) < 0 or min(inner_batch, test_inner_batch) < 1:
            raise ValueError("Reptile needs inner_steps, test_inner_steps >= 0 and inner_batch, test_inner_batch >= 1")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.inner_optimizer, self.inner_lr = inner_optimizer, inner_lr
        self.inner_steps, self.inner_batch = inner_steps, inner_batch
        self.test_inner_steps, self.test_inner_batch = test_inner_steps, test_inner_batch
        self.outer_step, self.anneal = outer_step, anneal
        self.network = self.build_network()
        self.carried_state = CarriedAdamState(self.network) if inner_state == "carried" else None

    def build_network(self) -> torch.nn.Module:
        hp = self.hparams
        return learner_network(self.problem, hp.ways, hp.in_channels, hp.image_size, hp.hidden, hp.in_features)

    # -- the inner loop ----------------------------------------------------------------------
    def fine_tune(self, inputs: torch.Tensor, targets: torch.Tensor, steps: int, batch: int,
                  carry_state: bool = False) -> tuple[Params, torch.Tensor]:
        """Parameters after ``steps`` optimiser steps from the initialisation on one task's examples, and the
        last mini-batch loss. Nothing is recorded for the outer loop (Reptile is first order). With a carried
        inner state the optimiser starts from it, and ``carry_state`` (training tasks) passes its end state on."""
        params = {name: value.detach().clone().requires_grad_() for name, value in self.network.named_parameters()}
        if self.inner_optimizer == "adam":
            optimizer = torch.optim.Adam(params.values(), lr=self.inner_lr, betas=(0.0, 0.999))
            if self.carried_state is not None:
                self.carried_state.load_into(optimizer, params)
        else:
            optimizer = torch.optim.SGD(params.values(), lr=self.inner_lr)
        loss = torch.zeros((), device=inputs.device)
        with torch.enable_grad():
            for chosen in minibatch_order(inputs.shape[0], steps, batch, inputs.device):
                loss = self.loss_fn(functional_call(self.network, params, (inputs[chosen],)), targets[chosen])
                gradients = torch.autograd.grad(loss, list(params.values()))
                for value, gradient in zip(params.values(), gradients):
                    value.grad = gradient
                optimizer.step()
        if carry_state and self.carried_state is not None:
            self.carried_state.save_from(optimizer, params)
        return {name: value.detach() for name, value in params.items()}, loss.detach()

    # -- the outer loop ----------------------------------------------------------------------
    def epsilon(self) -> float:
        """The interpolation step at the current step: linearly from ``outer_step`` down to 0."""
        if not self.anneal:
            return self.outer_step
        return self.outer_step * max(0.0, 1.0 - self.global_step / self.trainer.max_steps)

    def on_fit_start(self) -> None:
        if self.anneal and (self.trainer.max_steps is None or self.trainer.max_steps < 1):
            raise ValueError("Reptile anneals its outer step size to 0 over the run, so the Trainer needs "
                             "max_steps (bench: --steps N); or pass anneal=False for a constant step")

    def training_step(self, episode: Episode, batch_idx: int) -> torch.Tensor:
        """One outer step: adapt to every task, then ``theta <- theta - epsilon * (theta - mean phi)`` via SGD."""
        inputs = torch.cat([episode.support_x, episode.query_x], dim=1)
        targets = torch.cat([episode.support_y, episode.query_y], dim=1)
        adapted, losses = zip(*(self.fine_tune(inputs[t], targets[t], self.inner_steps, self.inner_batch, carry_state=True)
                                for t in range(episode.tasks)))
        loss = torch.stack(losses).mean()
        self.check_finite(loss)
        optimizer = self.optimizers()
        epsilon = self.epsilon()
        for group in optimizer.param_groups:
            group["lr"] = epsilon
        for name, value in self.network.named_parameters():
            mean_adapted = torch.stack([task[name] for task in adapted]).mean(0)
            value.grad = self.trainer.strategy.reduce(value.detach() - mean_adapted, reduce_op="mean")
        optimizer.step()
        optimizer.zero_grad()
        self.log("train/loss", loss, prog_bar=True, batch_size=episode.tasks)
        self.log("train/epsilon", epsilon, batch_size=episode.tasks)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD on ``theta - mean phi``: a step of size epsilon is exactly Reptile's interpolation."""
        return torch.optim.SGD(self.network.parameters(), lr=self.outer_step)

    def predict(self, episode: Episode) -> torch.Tensor:
        """Fine-tune a copy of the initialisation on each support set, predict its query set."""
        outputs = []
        for t in range(episode.tasks):
            params, _ = self.fine_tune(episode.support_x[t], episode.support_y[t],
                                       self.test_inner_steps, self.test_inner_batch)
            outputs.append(functional_call(self.network, params, (episode.query_x[t],)))
        return torch.stack(outputs)
