"""The "pretrained on all tasks" baseline of MAML's regression experiment (Finn et al. 2017, Sec. 5.1, Fig. 2).

One network (MAML's 40-40 MLP) is trained by ordinary regression on the points of randomly drawn
tasks, all tasks mixed, with no inner loop; at test time it is fine-tuned by ``test_inner_steps``
gradient steps of size ``inner_lr`` on each task's K support points, exactly as MAML is evaluated.
Because the tasks disagree (random phases), the pretrained network learns roughly their average,
which one gradient step from K points cannot turn into the task's sinusoid: the paper's point.
The paper tunes the baseline's test-time step size; here it is ``inner_lr`` (MAML's 0.01 by default).
"""
from __future__ import annotations

import torch

from datamodules.episodes import Episode
from tasks.maml import MAML


class Pretrained(MAML):
    """Joint regression on all tasks' points, then MAML-style fine-tuning at test time (see module docstring).

    It reuses MAML's network and its ``predict`` (``test_inner_steps`` SGD steps of ``inner_lr`` on the
    support set); only training differs. Regression data sets only: in classification episodes the
    labels are re-drawn per episode, so there is nothing to pretrain a head on.
    """

    def __init__(self, ways: int = 1, hidden: int = 40, in_features: int = 1, problem: str = "regression",
                 lr: float = 1e-3, inner_lr: float = 0.01, test_inner_steps: int = 1) -> None:
        if problem != "regression":
            raise ValueError(f"pretrained is the regression baseline of MAML Fig. 2 and cannot run on a "
                             f"{problem} data set: use a regression data set (sinusoid, linear)")
        super().__init__(ways=ways, hidden=hidden, in_features=in_features, problem=problem, lr=lr,
                         inner_lr=inner_lr, inner_steps=0, test_inner_steps=test_inner_steps)

    def training_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE on every point of every task of the meta-batch (support and query alike)."""
        inputs = torch.cat([episode.support_x, episode.query_x], dim=1)
        targets = torch.cat([episode.support_y, episode.query_y], dim=1)
        outputs = self.network(inputs.flatten(0, 1)).view(*targets.shape[:2], -1)
        return self.loss_fn(outputs, targets), outputs[:, episode.support_x.shape[1]:]
