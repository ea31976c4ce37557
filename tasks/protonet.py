"""Prototypical Networks (Snell, Swersky & Zemel 2017, "Prototypical Networks for Few-shot Learning").

Each class is represented by the mean embedding (prototype) of its support examples; a query is
classified by a softmax over negative squared Euclidean distances to the prototypes. Defaults follow
the paper's Omniglot setting: Conv-4 with 64 filters, Adam at 1e-3 halved every 2000 episodes.

``temperature`` divides the distances before the softmax (1 = the paper). Training episodically from a
backbone pre-trained as a classifier needs it: that backbone's squared distances are in the hundreds, so at
temperature 1 the softmax is nearly one-hot and the first episodes' loss is several times its minimum over
temperatures; its gradients then reshape the backbone to shrink distances rather than to separate classes.
Ye et al. 2020 ("Few-Shot Learning via Embedding Adaptation with Set-to-Set Functions", FEAT) fine-tune a
pre-trained ProtoNet with such a temperature; Oreshkin et al. 2018 (TADAM) call it metric scaling.

``metric="cosine"`` scores a query by its cosine similarity to each prototype instead (divided by the
temperature: the scale of Chen et al. 2021, "Meta-Baseline: Exploring Simple Meta-Learning for Few-Shot
Learning", whose meta stage is this classifier on a pre-trained backbone). It ignores the feature norms,
which are large and vary from image to image in a backbone pre-trained as a classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.episodes import Episode
from tasks.backbones import Conv4
from tasks.base import EpisodicTask


def prototypes(support: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means ``[tasks, ways, dim]`` of support embeddings ``[tasks, n, dim]``."""
    one_hot = torch.nn.functional.one_hot(labels, ways).to(support.dtype)  # [tasks, n, ways]
    return one_hot.transpose(1, 2) @ support / one_hot.sum(1).unsqueeze(-1)


def squared_distances(queries: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``||q - c||^2`` for every query and centre: ``[tasks, n, dim] x [tasks, ways, dim] -> [tasks, n, ways]``."""
    return (queries.pow(2).sum(-1, keepdim=True) - 2 * queries @ centres.transpose(1, 2)
            + centres.pow(2).sum(-1).unsqueeze(1)).clamp_min(0)


def cosine_similarities(queries: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``cos(q, c)`` for every query and centre: ``[tasks, n, dim] x [tasks, ways, dim] -> [tasks, n, ways]``."""
    return F.normalize(queries, dim=-1) @ F.normalize(centres, dim=-1).transpose(1, 2)


METRICS = ("euclidean", "cosine")


class ProtoNet(EpisodicTask):
    """Prototypical Networks on a Conv-4 embedding (see module docstring)."""

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 lr: float = 1e-3, lr_decay_every: int = 2000, lr_decay: float = 0.5,
                 temperature: float = 1.0, metric: str = "euclidean") -> None:
        super().__init__(ways=ways, lr=lr, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
        if not temperature > 0:
            raise ValueError(f"protonet: temperature must be positive (got {temperature}); 1 is the paper's "
                             "softmax over negative squared distances")
        if metric not in METRICS:
            raise ValueError(f"protonet: unknown metric {metric!r}; use 'euclidean' (Snell et al.'s squared "
                             "distance) or 'cosine' (Chen et al. 2021)")
        self.save_hyperparameters()
        self.encoder = Conv4(in_channels, hidden, image_size)

    def embed(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of support and query sets in one forward pass (one BatchNorm batch)."""
        tasks, n_support = episode.support_x.shape[:2]
        images = torch.cat([episode.support_x, episode.query_x], dim=1).flatten(0, 1)
        features = self.encoder(images).view(tasks, -1, self.encoder.output_dim)
        return features[:, :n_support], features[:, n_support:]

    def scores(self, episode: Episode) -> torch.Tensor:
        """Scores ``[tasks, queries, ways]`` of each query for each class prototype, before the temperature:
        negative squared Euclidean distances, or cosine similarities (``metric``)."""
        support, queries = self.embed(episode)
        centres = prototypes(support, episode.support_y, episode.ways)
        if self.hparams.metric == "cosine":
            return cosine_similarities(queries, centres)
        return -squared_distances(queries, centres)

    def logits(self, episode: Episode) -> torch.Tensor:
        return self.scores(episode) / self.hparams.temperature

    def embedding_network(self) -> nn.Module:
        return self.encoder

    def training_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(episode)
        return self.loss_fn(logits.flatten(0, 1), episode.query_y.flatten()), logits

    def predict(self, episode: Episode) -> torch.Tensor:
        return self.logits(episode)
