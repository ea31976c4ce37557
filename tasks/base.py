"""EpisodicTask: the train / validation / test loop every algorithm shares.

An algorithm implements only what differs between algorithms:

* ``training_loss(episode) -> (loss, query_outputs)`` for one meta-batch, and
* ``predict(episode) -> query_outputs`` for evaluation episodes (adapting on the support set first
  where the algorithm does so).

Everything else lives here: the loss for the problem kind (cross-entropy for classification, MSE
for regression), per-episode scores through torchmetrics, the fixed-episode test record (every
episode's score, mean and 95% confidence interval, gathered across DDP ranks and de-duplicated by
episode id), a clear error on a non-finite loss, and the Adam optimiser with step decay.
"""
from __future__ import annotations

import math
from typing import ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.functional.classification import multiclass_accuracy

from datamodules.episodes import Episode

PROBLEMS = ("classification", "regression")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message says where and what to change."""


class EpisodicTask(pl.LightningModule):
    """Base LightningModule for episodic meta-learning (see module docstring).

    Args:
        ways: classes per evaluation episode (the output size of classifier heads).
        problem: ``"classification"`` (score: accuracy) or ``"regression"`` (score: MSE).
        lr: outer-loop (meta) learning rate of Adam.
        lr_decay_every, lr_decay: multiply the learning rate by ``lr_decay`` every that many steps
            (0 disables).

    ``default_meta_batch`` is the number of episodes per training step a run gets when its config
    leaves ``meta_batch`` unset: one episode per step unless the algorithm's paper batches tasks.
    """

    default_meta_batch: ClassVar[int] = 1

    def __init__(self, ways: int = 5, problem: str = "classification", lr: float = 1e-3,
                 lr_decay_every: int = 0, lr_decay: float = 0.5) -> None:
        super().__init__()
        if problem not in PROBLEMS:
            raise ValueError(f"unknown problem {problem!r}: use one of {PROBLEMS}")
        self.ways, self.problem = ways, problem
        self.lr, self.lr_decay_every, self.lr_decay = lr, lr_decay_every, lr_decay
        self.val_score = MeanMetric()
        self.test_scores = CatMetric()
        self.test_ids = CatMetric()
        self.test_summary: dict = {}
        self.execution: dict = {}  # how the run executed (e.g. the loop/vmap choice); copied into the run record

    # -- what an algorithm implements --------------------------------------------------------
    def embedding_network(self) -> nn.Module:
        """The feature extractor one run can hand to another (``save_weights`` / ``init_from``, bench.weights)."""
        raise ValueError(f"{type(self).__name__} has no stand-alone embedding network to save or initialise "
                         "from another run; init_from/save_weights work with baseline, baselinepp, protonet, "
                         "matching, relation, siamese and the MAML family (maml, fomaml, metasgd, anil)")

    def training_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predict(self, episode: Episode) -> torch.Tensor:
        raise NotImplementedError

    # -- shared pieces -----------------------------------------------------------------------
    @property
    def score_name(self) -> str:
        return "acc" if self.problem == "classification" else "mse"

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on logits, or MSE on predictions, averaged over examples."""
        if self.problem == "classification":
            return F.cross_entropy(outputs, targets)
        return F.mse_loss(outputs.reshape(targets.shape), targets)

    def episode_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One score per episode: accuracy of ``outputs [tasks, n, ways]``, or MSE of predictions."""
        if self.problem == "classification":
            return multiclass_accuracy(outputs.argmax(-1), targets, num_classes=outputs.shape[-1],
                                       average="micro", multidim_average="samplewise")
        return (outputs.reshape(targets.shape) - targets).pow(2).flatten(1).mean(1)

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{type(self).__name__}: loss became {loss.item()} at step {self.global_step}. "
                f"Lower the learning rate (lr={self.lr}) or the inner-loop step size, "
                "and check the inputs for NaNs."
            )

    # -- Lightning loop ----------------------------------------------------------------------
    def training_step(self, episode: Episode, batch_idx: int) -> torch.Tensor:
        loss, outputs = self.training_loss(episode)
        self.check_finite(loss)
        score = self.episode_scores(outputs.detach(), episode.query_y).mean()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=episode.tasks)
        self.log(f"train/{self.score_name}", score, prog_bar=True, batch_size=episode.tasks)
        return loss

    def validation_step(self, episode: Episode, batch_idx: int) -> None:
        self.val_score.update(self.episode_scores(self.predict(episode), episode.query_y))

    def on_validation_epoch_end(self) -> None:
        self.log(f"val/{self.score_name}", self.val_score.compute(), prog_bar=True, sync_dist=False)
        self.val_score.reset()

    def test_step(self, episode: Episode, batch_idx: int) -> None:
        self.test_scores.update(self.episode_scores(self.predict(episode), episode.query_y))
        self.test_ids.update(episode.ids.to(torch.float64))

    def on_test_epoch_end(self) -> None:
        scores = self.test_scores.compute().double().flatten().cpu()
        ids = self.test_ids.compute().long().flatten().cpu()
        self.test_scores.reset()
        self.test_ids.reset()
        self.test_summary = summarize_episodes(ids, scores)
        self.log(f"test/{self.score_name}", self.test_summary["mean"], sync_dist=False)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.lr_decay_every:
            return optimizer
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, self.lr_decay_every, self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def summarize_episodes(ids: torch.Tensor, scores: torch.Tensor) -> dict:
    """Per-episode scores ordered by episode id (duplicates from DDP padding dropped), mean, 95% CI."""
    order = torch.argsort(ids, stable=True)
    ids, scores = ids[order], scores[order]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1:] = ids[1:] != ids[:-1]
    ids, scores = ids[keep], scores[keep]
    count = scores.numel()
    mean = scores.mean().item() if count else float("nan")
    std = scores.std(unbiased=True).item() if count > 1 else 0.0
    return {
        "episodes": count,
        "mean": mean,
        "std": std,
        "ci95": 1.96 * std / math.sqrt(count) if count else float("nan"),
        "episode_ids": ids.tolist(),
        "episode_scores": scores.tolist(),
    }
