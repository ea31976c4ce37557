"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang 2019, "A Closer Look at Few-shot Classification").

Training is ordinary supervised learning: the backbone and a classifier over ALL training classes are
trained on plain mini-batches (the data module's ``train_mode="batches"``), no episodes. At test time
the backbone is frozen and, for every episode, a new classifier over the episode's N classes is fitted
on the support features alone; the queries are classified by it.

* Baseline: linear classifiers, ``W x + b``.
* Baseline++: cosine classifiers, ``scale * cos(x, w_c)``, which the paper argues reduce
  intra-class variation. (The authors' code also learns a per-class weight norm; we keep the pure
  cosine, so the logits are bounded by the scale as in the paper's description.)

Defaults from the paper (Sec. 4.1) and its code: Conv-4 backbone, Adam at 1e-3 with mini-batches of 16
(set by the data module's ``batch_size``); at test time 100 epochs of SGD (lr 0.01, momentum 0.9,
dampening 0.9, weight decay 1e-3) with mini-batches of 4 on the support set: 2 steps an epoch in 5-way
1-shot, 7 in 5-way 5-shot. The classifiers of all tasks of an evaluation batch are fitted at once on the
support features (the tasks do not interact: the loss is a sum of per-task losses), each task with its
own initialisation and shuffles, seeded by its episode id. Cosine scales as in the authors' code: 10 for the many-class training
classifier, 2 for the N-way (N <= 200) test classifier. On Omniglot the authors stop training early
(within about 5 epochs), since there is no data augmentation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.batches import LabelledBatch
from datamodules.episodes import Episode, seeded_generator
from tasks.backbones import Conv4
from tasks.base import EpisodicTask
from tasks.embedding import embed_episode

CLASSIFIERS = ("linear", "cosine")
# Seeds the per-episode initialisation of the test-time classifiers (with the episode id).
FINETUNE_SEED = 0xF17E


def cosine_logits(features: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * cos(features, weights)``: ``[..., n, dim] x [..., classes, dim] -> [..., n, classes]``, in [-scale, scale]."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(weights, dim=-1).transpose(-1, -2)


class CosineClassifier(nn.Module):
    """Baseline++'s classifier: scaled cosine similarity between a feature and each class's weight vector."""

    def __init__(self, dim: int, classes: int, scale: float) -> None:
        super().__init__()
        bound = 1 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(classes, dim).uniform_(-bound, bound))
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight, self.scale)


class Baseline(EpisodicTask):
    """Baseline (``classifier="linear"``) / Baseline++ (``"cosine"``), see module docstring.

    Args:
        train_classes: number of training classes (the data module's ``task_arguments()`` give it).
        classifier: ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++).
        scale: cosine scale of the training classifier; finetune_scale: of the test-time classifier.
        finetune_epochs, finetune_batch, finetune_lr, finetune_momentum, finetune_dampening,
            finetune_weight_decay: the SGD that fits each episode's classifier on its support features.
    """

    default_classifier = "linear"

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 train_classes: int | None = None, classifier: str | None = None, scale: float = 10.0,
                 finetune_scale: float = 2.0, finetune_epochs: int = 100, finetune_batch: int = 4,
                 finetune_lr: float = 0.01,
                 finetune_momentum: float = 0.9, finetune_dampening: float = 0.9,
                 finetune_weight_decay: float = 1e-3, lr: float = 1e-3, lr_decay_every: int = 0,
                 lr_decay: float = 0.5) -> None:
        super().__init__(ways=ways, lr=lr, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
        classifier = classifier or self.default_classifier
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {classifier!r}: use 'linear' (Baseline) or 'cosine' (Baseline++)")
        if not train_classes or train_classes < 2:
            raise ValueError(f"{type(self).__name__} needs train_classes >= 2, the number of training classes "
                             f"(got {train_classes}); the data module's task_arguments() provide it")
        if finetune_epochs < 1 or finetune_batch < 1:
            raise ValueError(f"finetune_epochs and finetune_batch must be at least 1 (got {finetune_epochs}, "
                             f"{finetune_batch})")
        self.save_hyperparameters()
        self.classifier = classifier
        self.backbone = Conv4(in_channels, hidden, image_size)
        dim = self.backbone.output_dim
        self.head = CosineClassifier(dim, train_classes, scale) if classifier == "cosine" else nn.Linear(dim, train_classes)

    # -- pre-training on ordinary mini-batches ---------------------------------------------
    def embedding_network(self) -> nn.Module:
        return self.backbone

    def training_loss(self, batch: LabelledBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, LabelledBatch):
            raise TypeError(f"{type(self).__name__} pre-trains on ordinary mini-batches over all training classes, "
                            "not episodes: build the data module with train_mode='batches' "
                            "(bench: --data train_mode=batches)")
        logits = self.head(self.backbone(batch.images))
        return self.loss_fn(logits, batch.labels), logits.unsqueeze(0)

    # -- test time: a new classifier per episode on frozen features --------------------------
    def episode_logits(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[tasks, n, ways]`` of the per-episode classifiers ``weight [tasks, ways, dim]`` (+ ``bias``)."""
        if self.classifier == "cosine":
            return cosine_logits(features, weight, self.hparams.finetune_scale)
        return features @ weight.transpose(1, 2) + bias.unsqueeze(1)

    def initial_classifiers(self, generators: list[torch.Generator], ways: int, dim: int,
                            like: torch.Tensor) -> list[torch.Tensor]:
        """Uniform(-1/sqrt(dim), 1/sqrt(dim)) initial weight (and bias) of each task, from its own generator."""
        bound = 1 / math.sqrt(dim)

        def uniform(*shape: int) -> torch.Tensor:
            values = torch.stack([torch.rand(shape, generator=generator) for generator in generators])
            return (values * 2 * bound - bound).to(like).requires_grad_()

        weight = uniform(ways, dim)
        return [weight] if self.classifier == "cosine" else [weight, uniform(ways)]

    def fit_classifiers(self, support: torch.Tensor, support_y: torch.Tensor, ids: torch.Tensor,
                        ways: int) -> list[torch.Tensor]:
        """Fit one classifier per task on its (detached) support features ``[tasks, n, dim]``.

        Initialisation and shuffles of a task come from a generator seeded by its episode id, so a fixed
        episode gets the same classifier whatever batch or run order it comes in.
        """
        hp = self.hparams
        generators = [seeded_generator(FINETUNE_SEED, int(i)) for i in ids.tolist()]
        parameters = self.initial_classifiers(generators, ways, support.shape[-1], support)
        optimizer = torch.optim.SGD(parameters, lr=hp.finetune_lr, momentum=hp.finetune_momentum,
                                    dampening=hp.finetune_dampening, weight_decay=hp.finetune_weight_decay)
        n_support = support.shape[1]
        with torch.enable_grad():
            for _ in range(hp.finetune_epochs):
                order = torch.stack([torch.randperm(n_support, generator=g) for g in generators]).to(support.device)
                for picked in order.split(hp.finetune_batch, dim=1):
                    features = support.gather(1, picked.unsqueeze(-1).expand(-1, -1, support.shape[-1]))
                    logits = self.episode_logits(features, parameters[0], parameters[1] if len(parameters) > 1 else None)
                    # Sum over tasks of each task's mean loss: every task gets its own, unscaled gradient.
                    loss = F.cross_entropy(logits.flatten(0, 1), support_y.gather(1, picked).flatten(),
                                           reduction="sum") / picked.shape[1]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        return [parameter.detach() for parameter in parameters]

    def predict(self, episode: Episode) -> torch.Tensor:
        with torch.no_grad():
            support, queries = embed_episode(self.backbone, episode)
        weight, *bias = self.fit_classifiers(support, episode.support_y, episode.ids, episode.ways)
        return self.episode_logits(queries, weight, bias[0] if bias else None)


class BaselinePlusPlus(Baseline):
    """Baseline++: :class:`Baseline` with cosine classifiers for pre-training and at test time."""

    default_classifier = "cosine"
