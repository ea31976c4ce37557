"""Meta-LSTM learned optimizer (Ravi & Larochelle 2017, "Optimization as a Model for Few-Shot Learning").

A learner network (Conv-4) is trained on a task's support set by ``inner_steps`` updates that a
meta-learner computes coordinate by coordinate, with weights shared by all coordinates. The
meta-learner is an LSTM whose cell state IS the learner's flat parameter vector:

    theta_t = f_t * theta_{t-1} + i_t * (-grad_t)
    f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)    learned forgetting (weight decay)
    i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)    learned learning rate

where ``h_t`` is the output of a first, ordinary LSTM layer whose input per coordinate is the
preprocessed gradient and the preprocessed loss (log-magnitude and sign, Andrychowicz et al. 2016,
"Learning to learn by gradient descent by gradient descent", App. A, p = 10). The initial cell state
``theta_0`` -- the learner's initialisation -- is meta-learned as well. The meta-loss is the learner's
query loss after the last update, backpropagated through the unrolled updates into the LSTM, the
gates and ``theta_0``. As in the paper, second derivatives through the gradient and loss inputs are
ignored: they are computed on detached parameters and enter the meta-learner as constants (the
dependence of ``theta_t`` on the meta-parameters through the gates and ``theta_{t-1}`` is kept).

Defaults follow the paper: learner Conv-4 with 32 filters, BatchNorm on batch statistics;
meta-learner with a 20-unit first layer; forget-gate bias drawn from U[4, 6] and input-gate bias
from U[-5, -4], so that training starts as gradient descent with a small step and no decay; Adam at
1e-3 with the gradient norm clipped to 0.25, and 8 full-batch updates per episode, as in the authors'
released (5-shot) configuration.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from datamodules.episodes import Episode
from tasks.base import EpisodicTask
from tasks.maml import learner_network

LSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def preprocess(values: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al. 2016, App. A: ``x -> (log|x| / p, sign x)`` if ``|x| >= e^-p``, else ``(-1, e^p x)``.

    Returns ``[..., 2]``; scale-free for large inputs, linear for tiny ones.
    """
    threshold = math.exp(-p)
    large = values.abs() >= threshold
    log_magnitude = torch.where(large, values.abs().clamp_min(threshold).log() / p, torch.full_like(values, -1.0))
    sign = torch.where(large, values.sign(), values * math.exp(p))
    return torch.stack([log_magnitude, sign], dim=-1)


class CoordinateLSTMOptimizer(nn.Module):
    """The two-layer coordinate-wise meta-learner: an LSTM on (gradient, loss), then the parameter cell."""

    def __init__(self, hidden: int = 20) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(4, hidden)
        self.forget_gate = nn.Linear(hidden + 2, 1)
        self.input_gate = nn.Linear(hidden + 2, 1)
        for gate in (self.forget_gate, self.input_gate):
            nn.init.uniform_(gate.weight, -0.01, 0.01)
        nn.init.uniform_(self.forget_gate.bias, 4.0, 6.0)
        nn.init.uniform_(self.input_gate.bias, -5.0, -4.0)

    def initial_state(self, coordinates: int, like: torch.Tensor) -> LSTMState:
        """Zero LSTM state and zero previous gates for ``coordinates`` coordinates."""
        hidden = like.new_zeros(coordinates, self.lstm.hidden_size)
        gate = like.new_zeros(coordinates)
        return hidden, hidden, gate, gate

    def forward(self, parameters: torch.Tensor, gradients: torch.Tensor, losses: torch.Tensor,
                state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """One update of ``parameters [tasks, n]`` given ``gradients [tasks, n]`` and ``losses [tasks]``.

        ``gradients`` and ``losses`` are inputs, not functions of the meta-parameters (see module docstring).
        """
        tasks, count = parameters.shape
        features = torch.cat([preprocess(gradients), preprocess(losses).unsqueeze(1).expand(tasks, count, 2)], dim=-1)
        hidden, cell, forget_prev, input_prev = state
        hidden, cell = self.lstm(features.reshape(tasks * count, 4), (hidden, cell))
        theta = parameters.reshape(-1, 1)
        forget = torch.sigmoid(self.forget_gate(torch.cat([hidden, theta, forget_prev.unsqueeze(1)], dim=1))).squeeze(1)
        learn = torch.sigmoid(self.input_gate(torch.cat([hidden, theta, input_prev.unsqueeze(1)], dim=1))).squeeze(1)
        updated = forget * parameters.reshape(-1) - learn * gradients.reshape(-1)
        return updated.view(tasks, count), (hidden, cell, forget, learn)


class MetaLSTM(EpisodicTask):
    """Ravi & Larochelle's meta-learner LSTM training a Conv-4 learner (see module docstring).

    Args:
        hidden: learner Conv-4 filters (or regression MLP width). inner_steps: updates per episode (T),
            in training and evaluation alike. meta_hidden: units of the meta-learner's first LSTM layer.
        grad_clip: clip the meta-gradient's norm to this value (0 disables).
    """

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 32,
                 in_features: int = 1, problem: str = "classification", lr: float = 1e-3, inner_steps: int = 8,
                 meta_hidden: int = 20, grad_clip: float = 0.25, lr_decay_every: int = 0, lr_decay: float = 0.5) -> None:
        super().__init__(ways=ways, problem=problem, lr=lr, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0 (got {inner_steps})")
        self.save_hyperparameters()
        self.inner_steps, self.grad_clip = inner_steps, grad_clip
        self.network = learner_network(problem, ways, in_channels, image_size, hidden, in_features)
        self.meta_learner = CoordinateLSTMOptimizer(meta_hidden)

    def learner(self, flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The learner network's outputs on ``inputs`` with the flat parameter vector ``flat``."""
        names, shapes = zip(*((name, value.shape) for name, value in self.network.named_parameters()))
        pieces = torch.split(flat, [shape.numel() for shape in shapes])
        return functional_call(self.network, {n: p.view(s) for n, p, s in zip(names, pieces, shapes)}, (inputs,))

    def learner_gradients(self, parameters: torch.Tensor, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Support-set gradients ``[tasks, n]`` and losses ``[tasks]`` at ``parameters``, off the meta-graph."""
        gradients, losses = [], []
        with torch.enable_grad():
            for t in range(episode.tasks):
                flat = parameters[t].detach().requires_grad_()
                loss = self.loss_fn(self.learner(flat, episode.support_x[t]), episode.support_y[t])
                gradients.append(torch.autograd.grad(loss, flat)[0])
                losses.append(loss.detach())
        return torch.stack(gradients), torch.stack(losses)

    def adapted_query_outputs(self, episode: Episode) -> torch.Tensor:
        """Query outputs ``[tasks, n_query, ...]`` of the learner after ``inner_steps`` meta-learner updates."""
        initial = torch.cat([value.flatten() for value in self.network.parameters()])
        parameters = initial.expand(episode.tasks, -1)
        state = self.meta_learner.initial_state(parameters.numel(), initial)
        for _ in range(self.inner_steps):
            gradients, losses = self.learner_gradients(parameters, episode)
            parameters, state = self.meta_learner(parameters, gradients, losses, state)
        return torch.stack([self.learner(parameters[t], episode.query_x[t]) for t in range(episode.tasks)])

    def training_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.adapted_query_outputs(episode)
        return self.loss_fn(outputs.flatten(0, 1), episode.query_y.flatten(0, 1)), outputs

    def predict(self, episode: Episode) -> torch.Tensor:
        """Evaluation runs the same updates; under Lightning's no_grad no meta-graph is kept."""
        return self.adapted_query_outputs(episode)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the meta-gradient norm to ``grad_clip`` (the paper's 0.25) unless the Trainer sets its own."""
        if gradient_clip_val is None and self.grad_clip:
            gradient_clip_val, gradient_clip_algorithm = self.grad_clip, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)
