"""MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks").

Learns an initialisation from which a few gradient steps on a task's support set fit that task.
The meta-gradient flows through the inner updates (second order) unless ``first_order`` is set
(FOMAML, same paper, Sec. 5.2). Defaults are the paper's 5-way Omniglot setting: Conv-4 with 64
filters, one inner step of size 0.4 during training, three at test time, Adam meta-optimiser at 1e-3.
BatchNorm uses batch statistics at all times, as in the reference implementation. On a regression
data set (``problem="regression"``) the network is the paper's sinusoid MLP (:mod:`tasks.regression`).

FOMAML, Meta-SGD and ANIL are subclasses that change one hook each: ``first_order``,
:meth:`MAML.step_size` and :meth:`MAML.split_parameters` / :meth:`MAML.task_query_outputs`.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch

from datamodules.episodes import Episode
from tasks.backbones import Classifier, Conv4
from tasks.base import EpisodicTask
from tasks.inner_loop import Params, adapt, per_task, task_by_task_meta_loss
from tasks.regression import regression_network
from tasks.vectorize import AUTO, VectorizeChoice, check_vectorize, resolve
from torch.func import functional_call


def learner_network(problem: str, ways: int, in_channels: int, image_size: int, hidden: int,
                    in_features: int) -> torch.nn.Module:
    """The network gradient-based learners adapt: a Conv-4 classifier (BatchNorm on batch statistics),
    or for regression MAML's MLP with ``hidden`` units per layer; both are ``backbone`` + ``head``."""
    if problem == "regression":
        return regression_network(in_features, hidden)
    backbone = Conv4(in_channels, hidden, image_size, track_running_stats=False)
    return Classifier(backbone, backbone.output_dim, ways)


class MAML(EpisodicTask):
    """MAML / FOMAML on a Conv-4 classifier (or any ``network`` given by a subclass).

    Args:
        inner_lr: inner-loop step size alpha. inner_steps / test_inner_steps: adaptation steps during
            meta-training / evaluation. first_order: drop second-order terms (FOMAML).
        vectorize: run the tasks of a meta-batch under ``torch.func.vmap`` (True), in a loop (False), or
            whichever is faster on the device and shapes, measured once (``"auto"``, see
            :mod:`tasks.vectorize`; training's choice is kept in ``execution["vectorize"]``, evaluation's,
            measured separately, in ``execution["vectorize_evaluation"]``, and both in the run record).
        hidden: Conv-4 filters, or the regression MLP's width. in_features: regression input size.
    """

    default_meta_batch: ClassVar[int] = 32  # Finn et al. 2017, App. A.1: 32 tasks per meta-batch (Omniglot 5-way)

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 in_features: int = 1, problem: str = "classification", lr: float = 1e-3, inner_lr: float = 0.4,
                 inner_steps: int = 1, test_inner_steps: int = 3, first_order: bool = False,
                 vectorize: bool | str = AUTO, lr_decay_every: int = 0, lr_decay: float = 0.5) -> None:
        super().__init__(ways=ways, problem=problem, lr=lr, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
        self.save_hyperparameters()
        self.inner_lr, self.inner_steps, self.test_inner_steps = inner_lr, inner_steps, test_inner_steps
        self.first_order, self.vectorize = first_order, check_vectorize(vectorize)
        self.network = self.build_network()
        self.vectorize_choice: VectorizeChoice | None = None  # training's
        self.evaluation_choice: VectorizeChoice | None = None
        if self.vectorize != AUTO:
            self.vectorize_choice = VectorizeChoice(self.vectorize, "given")
            self.execution["vectorize"] = self.vectorize_choice.to_dict()

    def build_network(self) -> torch.nn.Module:
        hp = self.hparams
        return learner_network(self.problem, hp.ways, hp.in_channels, hp.image_size, hp.hidden, hp.in_features)

    def embedding_network(self) -> torch.nn.Module:
        """The network under the adapted head (Conv-4, or the regression MLP's hidden layers): a run can start it
        from a pre-trained classifier's backbone (``init_from``, bench.weights), as Triantafillou et al. 2020
        ("Meta-Dataset") start fo-MAML; the head stays freshly initialised."""
        return self.network.backbone

    # -- what MAML-family variants change ----------------------------------------------------
    def split_parameters(self) -> tuple[Params, Params]:
        """``(adapted, frozen)`` parameters of the inner loop: MAML adapts all of them."""
        return dict(self.network.named_parameters()), {}

    def step_size(self) -> float | dict[str, torch.Tensor]:
        return self.inner_lr

    # -- the algorithm -----------------------------------------------------------------------
    def adapted_query_outputs(self, episode: Episode, steps: int, first_order: bool,
                              keep_graph: bool = True, vectorize: bool | None = None) -> torch.Tensor:
        """Query outputs ``[tasks, n_query, ...]`` after ``steps`` inner steps on each task's support set.

        ``keep_graph=False`` (evaluation) adapts detached copies, so no outer graph is built at all.
        ``vectorize`` overrides the resolved loop/vmap choice (used to measure both).
        """
        vectorize = self.resolve_vectorize(episode) if vectorize is None else vectorize
        one_task = self.one_task(steps, first_order, keep_graph)
        return per_task(one_task, vectorize)(episode.support_x, episode.support_y, episode.query_x)

    def one_task(self, steps: int, first_order: bool,
                 keep_graph: bool = True) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(support_x, support_y, query_x) -> query outputs`` of one task, from the current parameters."""
        fast, frozen = self.split_parameters()
        step_size = self.step_size()
        if not keep_graph:
            fast, frozen = _detached(fast), _detached(frozen)
            step_size = _detached(step_size) if isinstance(step_size, dict) else step_size

        def outputs(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
            return self.task_query_outputs(fast, frozen, step_size, support_x, support_y, query_x, steps, first_order)

        return outputs

    def meta_loss(self, episode: Episode, vectorize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The query loss after adaptation, averaged over tasks, and the query outputs ``[tasks, n_query, ...]``.

        vmap computes all tasks at once; the loop differentiates task by task and keeps one task's graph
        at a time (:func:`tasks.inner_loop.task_by_task_meta_loss`), which is also faster on a CPU.
        """
        if vectorize or not torch.is_grad_enabled():
            outputs = self.adapted_query_outputs(episode, self.inner_steps, self.first_order, vectorize=vectorize)
            return self.loss_fn(outputs.flatten(0, 1), episode.query_y.flatten(0, 1)), outputs
        one_task = self.one_task(self.inner_steps, self.first_order)

        def task_loss(t: int) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = one_task(episode.support_x[t], episode.support_y[t], episode.query_x[t])
            return self.loss_fn(outputs, episode.query_y[t]) / episode.tasks, outputs

        parameters = [p for p in self.parameters() if p.requires_grad]
        return task_by_task_meta_loss(task_loss, episode.tasks, parameters)

    def resolve_vectorize(self, episode: Episode) -> bool:
        """Training's loop/vmap choice: ``self.vectorize``, with ``"auto"`` decided on the first training episode
        by timing one meta-gradient both ways (see :mod:`tasks.vectorize`)."""
        if self.vectorize != AUTO:
            return self.vectorize
        if self.vectorize_choice is None:
            parameters = [p for p in self.parameters() if p.requires_grad]

            def meta_gradient(vectorize: bool) -> None:
                torch.autograd.grad(self.meta_loss(episode, vectorize)[0], parameters, allow_unused=True)

            self.vectorize_choice = self._choose("vectorize", meta_gradient, episode, {
                "first_order": self.first_order, "steps": self.inner_steps,
                "parameters": [list(p.shape) for p in parameters]})
        return self.vectorize_choice.vectorize

    def resolve_evaluation_vectorize(self, episode: Episode) -> bool:
        """Evaluation's loop/vmap choice, measured on its own: evaluation adapts first order without an outer
        graph, on evaluation batches whose shapes differ from training's, so training's choice can be several
        times slower there (Omniglot 20w1s on a CPU: vmap won MAML's training step, and testing with it took
        3x as long as FOMAML's looped test)."""
        if self.vectorize != AUTO:
            return self.vectorize
        if self.evaluation_choice is None:
            def adapt_and_predict(vectorize: bool) -> None:
                self.adapted_query_outputs(episode, self.test_inner_steps, first_order=True, keep_graph=False,
                                           vectorize=vectorize)

            self.evaluation_choice = self._choose("vectorize_evaluation", adapt_and_predict, episode,
                                                  {"phase": "evaluation", "steps": self.test_inner_steps})
        return self.evaluation_choice.vectorize

    def _choose(self, name: str, trial: Callable[[bool], None], episode: Episode, details: dict) -> VectorizeChoice:
        """Resolve one loop/vmap choice for ``episode``'s shapes and record it under ``execution[name]``."""
        key = {"algorithm": type(self).__name__, "dtype": str(episode.support_x.dtype),
               "support": list(episode.support_x.shape), "query": list(episode.query_x.shape), **details}
        with torch.enable_grad():
            choice = resolve(key, trial, episode.support_x.device)
        self.execution[name] = choice.to_dict()
        return choice

    def task_query_outputs(self, fast: Params, frozen: Params, step_size: float | dict[str, torch.Tensor],
                           support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                           steps: int, first_order: bool) -> torch.Tensor:
        """One task: adapt ``fast`` on its support set, return the outputs on its query set."""
        adapted = adapt(self.network, fast, frozen, support_x, support_y, self.loss_fn, steps, step_size, first_order)
        return functional_call(self.network, {**frozen, **adapted}, (query_x,))

    def training_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        return self.meta_loss(episode, self.resolve_vectorize(episode))

    def predict(self, episode: Episode) -> torch.Tensor:
        """Adapt on the support set with gradients enabled (Lightning evaluates under no_grad), keep no graph."""
        with torch.enable_grad():
            return self.adapted_query_outputs(episode, self.test_inner_steps, first_order=True, keep_graph=False,
                                              vectorize=self.resolve_evaluation_vectorize(episode))


def _detached(params: Params) -> Params:
    return {name: value.detach() for name, value in params.items()}
