"""Siamese Networks (Koch, Zemel & Salakhutdinov 2015, "Siamese Neural Networks for One-shot Image Recognition"), contrastive form.

Twin networks with shared weights embed two images; training teaches the embedding distance to tell
"same class" from "different class". Koch et al. score pairs with a learned weighted L1 distance and a
logistic output; here the pair loss is the contrastive loss of Hadsell, Chopra & LeCun 2006
("Dimensionality Reduction by Learning an Invariant Mapping") on the Euclidean distance d:

    L = (1 - y) * d^2 + y * max(0, m - d)^2,    y = 1 for a DIFFERENT-class pair, y = 0 for a same-class pair,

so same-class pairs are pulled together and different-class pairs pushed at least the margin m apart
(Hadsell et al.'s convention: Y = 1 for dissimilar pairs). One-shot classification is by the nearest
support example, as in Koch et al. Sec. 4.

Pairs come from the training episodes the data module already gives: every (query, support) pair of
an episode, from training classes only. In an N-way episode only 1 in N of those pairs is a same-class
pair, so the two kinds are balanced by weight (each kind contributes half of the loss) rather than by
discarding pairs. The embedding is the shared Conv-4 (Koch et al.'s larger network was built for
105x105 images), so the comparison with the other learners is about the training signal, not capacity.
Adam at 1e-3; margin 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.episodes import Episode
from tasks.backbones import Conv4
from tasks.base import EpisodicTask
from tasks.embedding import embed_episode, one_hot_labels
from tasks.protonet import squared_distances

# Distances are taken as sqrt(max(d^2, this)) so the gradient stays finite at d = 0.
MIN_SQUARED_DISTANCE = 1e-12


def contrastive_loss(squared: torch.Tensor, different: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-pair contrastive loss ``(1 - y) d^2 + y max(0, m - d)^2`` from squared distances ``d^2``.

    ``different`` is ``y``: True (1) for a pair of two different classes, False (0) for the same class.
    """
    distance = squared.clamp_min(MIN_SQUARED_DISTANCE).sqrt()
    pushed = (margin - distance).clamp_min(0).pow(2)
    return torch.where(different.bool(), pushed, squared)


def balanced_mean(losses: torch.Tensor, different: torch.Tensor) -> torch.Tensor:
    """Mean over same-class pairs and mean over different-class pairs, averaged with equal weight."""
    different = different.bool()
    if different.all() or not different.any():
        raise ValueError("contrastive training needs both same-class and different-class pairs in a batch")
    return 0.5 * (losses[different].mean() + losses[~different].mean())


def nearest_support_scores(squared: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Class scores ``[tasks, q, ways]``: minus the squared distance to the class's NEAREST support example.

    ``squared`` are query-to-support squared distances ``[tasks, q, n]``; the arg-max is 1-nearest-neighbour.
    """
    member = one_hot_labels(support_y, ways, torch.bool)  # [tasks, n, ways]
    scores = (-squared).unsqueeze(-1).masked_fill(~member.unsqueeze(1), float("-inf"))
    return scores.amax(dim=2)


class Siamese(EpisodicTask):
    """Siamese network with contrastive loss, evaluated by nearest support example (see module docstring).

    Args:
        margin: m, how far apart (in embedding distance) different-class pairs are pushed.
    """

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 margin: float = 1.0, lr: float = 1e-3, lr_decay_every: int = 0, lr_decay: float = 0.5) -> None:
        super().__init__(ways=ways, lr=lr, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
        if margin <= 0:
            raise ValueError(f"margin must be positive (got {margin})")
        self.save_hyperparameters()
        self.encoder = Conv4(in_channels, hidden, image_size)
        self.margin = margin

    def pair_distances(self, episode: Episode) -> torch.Tensor:
        """Squared embedding distances ``[tasks, q, n]`` of every (query, support) pair."""
        support, queries = embed_episode(self.encoder, episode)
        return squared_distances(queries, support)

    def embedding_network(self) -> nn.Module:
        return self.encoder

    def training_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        squared = self.pair_distances(episode)
        different = episode.query_y.unsqueeze(2) != episode.support_y.unsqueeze(1)
        loss = balanced_mean(contrastive_loss(squared, different, self.margin), different)
        return loss, nearest_support_scores(squared.detach(), episode.support_y, episode.ways)

    def predict(self, episode: Episode) -> torch.Tensor:
        return nearest_support_scores(self.pair_distances(episode), episode.support_y, episode.ways)
