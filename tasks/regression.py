"""The regression network of MAML's sinusoid experiment (Finn et al. 2017, Sec. 5.1).

"A neural network model with 2 hidden layers of size 40 with ReLU nonlinearities". It is built as
a feature body (:class:`MLP`) followed by a linear head, the same ``backbone`` / ``head`` layout as
the Conv-4 classifier, so every gradient-based learner (ANIL's head-only inner loop included)
runs on it unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from tasks.backbones import Classifier


class MLP(nn.Module):
    """``layers`` fully connected ReLU layers of width ``hidden``: ``[B, in_features] -> [B, hidden]``."""

    def __init__(self, in_features: int = 1, hidden: int = 40, layers: int = 2) -> None:
        super().__init__()
        if in_features < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"MLP needs in_features, hidden and layers >= 1 (got {in_features}, {hidden}, {layers})")
        widths = [in_features] + [hidden] * layers
        self.layers = nn.Sequential(*[module for i in range(layers)
                                      for module in (nn.Linear(widths[i], widths[i + 1]), nn.ReLU())])
        self.output_dim = hidden

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


def regression_network(in_features: int = 1, hidden: int = 40, outputs: int = 1) -> Classifier:
    """MAML's regression MLP (``in_features``-``hidden``-``hidden``-``outputs``) as body + linear head."""
    body = MLP(in_features, hidden)
    return Classifier(body, body.output_dim, outputs)
