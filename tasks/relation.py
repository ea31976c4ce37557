"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018, "Learning to Compare: Relation Network for Few-Shot Learning").

An embedding module maps images to feature maps; for K-shot episodes a class is represented by the
element-wise SUM of its support feature maps (Sec. 3.2). Each (class, query) pair of feature maps is
concatenated along the channels and scored by a learned relation module, ``r in [0, 1]`` (sigmoid).
The paper regresses the scores to the one-hot match (MSE, Eq. 3); ``loss="ce"`` trains instead with a
softmax cross-entropy over the relation module's pre-sigmoid outputs.

Architecture (Sec. 3.4, Fig. 2): embedding = four blocks of 3x3 convolution with 64 filters,
BatchNorm and ReLU, the first two followed by 2x2 max-pooling, the last two not; relation module =
two such blocks, each with max-pooling, then fully connected layers to 8 units (ReLU) and 1 (sigmoid).
Paddings, which the paper leaves open, follow the authors' Omniglot release: none in the first two
embedding blocks (28x28 images -> 64x5x5 feature maps), 1 in the later ones and in the relation module
(-> 64x1x1 before the fully connected layers, the paper's H = 64). Optimiser: Adam at 1e-3, halved
every 100,000 episodes, as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.episodes import Episode
from tasks.base import EpisodicTask
from tasks.embedding import embed_episode, one_hot_labels

LOSSES = ("mse", "ce")


def relation_block(in_channels: int, out_channels: int, padding: int, pool: bool) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU, and optionally 2x2 max-pooling."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=padding), nn.BatchNorm2d(out_channels),
              nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


def side_after(side: int, padding: int, pool: bool) -> int:
    """Spatial side after one :func:`relation_block` on a ``side x side`` input."""
    side = side + 2 * padding - 2
    return side // 2 if pool else side


class RelationEncoder(nn.Module):
    """The embedding module: ``[B, C, H, W] -> [B, hidden, s, s]`` feature maps (not flattened)."""

    PADDINGS, POOLS = (0, 0, 1, 1), (True, True, False, False)

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        channels = [in_channels] + [hidden] * 4
        self.blocks = nn.Sequential(*[relation_block(channels[i], channels[i + 1], padding, pool)
                                      for i, (padding, pool) in enumerate(zip(self.PADDINGS, self.POOLS))])
        side = image_size
        for padding, pool in zip(self.PADDINGS, self.POOLS):
            side = side_after(side, padding, pool)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for the Relation Network embedding (use >= 10)")
        self.output_shape = (hidden, side, side)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images)


class RelationModule(nn.Module):
    """Scores concatenated (class, query) feature maps ``[P, 2 * channels, s, s]``: one logit per pair."""

    def __init__(self, feature_shape: tuple[int, int, int], hidden: int = 64, fc_hidden: int = 8,
                 padding: int = 1) -> None:
        super().__init__()
        channels, side, _ = feature_shape
        self.blocks = nn.Sequential(relation_block(2 * channels, hidden, padding, pool=True),
                                    relation_block(hidden, hidden, padding, pool=True))
        side = side_after(side_after(side, padding, True), padding, True)
        if side < 1:
            raise ValueError(f"feature maps of side {feature_shape[1]} are too small for the relation module; "
                             "use a larger image_size or relation_padding=1")
        self.head = nn.Sequential(nn.Linear(hidden * side * side, fc_hidden), nn.ReLU(), nn.Linear(fc_hidden, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(pairs).flatten(1)).squeeze(-1)


class RelationNet(EpisodicTask):
    """Relation Networks (see module docstring).

    Args:
        loss: ``"mse"`` (the paper: relation scores regressed to one-hot) or ``"ce"`` (softmax
            cross-entropy over the pre-sigmoid relation outputs).
        fc_hidden: width of the relation module's first fully connected layer (8 in the paper).
        relation_padding: padding of the relation module's convolutions (1 for Omniglot's 5x5 maps).
    """

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 fc_hidden: int = 8, relation_padding: int = 1, loss: str = "mse", lr: float = 1e-3,
                 lr_decay_every: int = 100_000, lr_decay: float = 0.5) -> None:
        super().__init__(ways=ways, lr=lr, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
        if loss not in LOSSES:
            raise ValueError(f"unknown Relation Network loss {loss!r}: use 'mse' (the paper) or 'ce'")
        self.save_hyperparameters()
        self.encoder = RelationEncoder(in_channels, hidden, image_size)
        self.relation = RelationModule(self.encoder.output_shape, hidden, fc_hidden, relation_padding)
        self.loss_kind = loss

    def embedding_network(self) -> nn.Module:
        """The embedding module. Its parameters have Conv-4's names and shapes (only paddings and pooling
        differ), so it can start from a pre-trained Conv-4 backbone (``init_from``, bench.weights)."""
        return self.encoder

    def relation_logits(self, episode: Episode) -> torch.Tensor:
        """Pre-sigmoid relation outputs ``[tasks, q, ways]`` for every (query, class) pair."""
        support, queries = embed_episode(self.encoder, episode)
        tasks, n_query, feature_shape = queries.shape[0], queries.shape[1], queries.shape[2:]
        one_hot = one_hot_labels(episode.support_y, episode.ways, support.dtype)
        classes = (one_hot.transpose(1, 2) @ support.flatten(2)).view(tasks, episode.ways, *feature_shape)
        pairs = torch.cat([classes.unsqueeze(1).expand(-1, n_query, -1, *feature_shape),
                           queries.unsqueeze(2).expand(-1, -1, episode.ways, *feature_shape)], dim=3)
        return self.relation(pairs.flatten(0, 2)).view(tasks, n_query, episode.ways)

    def training_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.relation_logits(episode)
        scores = torch.sigmoid(logits)
        if self.loss_kind == "mse":
            loss = F.mse_loss(scores, one_hot_labels(episode.query_y, episode.ways, scores.dtype))
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        return loss, scores

    def predict(self, episode: Episode) -> torch.Tensor:
        """Relation scores ``[tasks, q, ways]`` in [0, 1]; the highest-scoring class is the prediction."""
        return torch.sigmoid(self.relation_logits(episode))
