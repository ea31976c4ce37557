"""Embedding an episode: the one forward pass metric-based learners share."""
from __future__ import annotations

import torch
from torch import nn

from datamodules.episodes import Episode


def embed_episode(encoder: nn.Module, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query embeddings ``[tasks, n, *feature_shape]`` from one forward pass.

    Support and query images of all tasks go through ``encoder`` together, so in training mode they
    share one BatchNorm batch, as in Prototypical and Matching Networks' episodic training.
    """
    tasks, n_support = episode.support_x.shape[:2]
    images = torch.cat([episode.support_x, episode.query_x], dim=1).flatten(0, 1)
    features = encoder(images)
    features = features.view(tasks, -1, *features.shape[1:])
    return features[:, :n_support], features[:, n_support:]


def one_hot_labels(labels: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """``labels [tasks, n]`` as one-hot rows ``[tasks, n, ways]`` of ``dtype``."""
    return nn.functional.one_hot(labels, ways).to(dtype)
