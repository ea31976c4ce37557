"""Functional inner-loop adaptation shared by MAML, FOMAML, Meta-SGD and ANIL.

Parameters are a ``{name: tensor}`` dict evaluated through :func:`torch.func.functional_call`, so the
adapted parameters of each task are ordinary tensors in the outer autograd graph: backpropagating
the query loss through them gives the exact second-order meta-gradient (Finn et al. 2017), and
detaching the inner gradients gives first-order MAML. The same per-task function runs in a Python
loop over the tasks of a meta-batch or under :func:`torch.func.vmap`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tasks.backbones import differentiated_twice, inside_task_vmap, under_task_vmap

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def adapt(
    model: nn.Module,
    fast: Params,
    frozen: Params,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    steps: int,
    step_size: float | Mapping[str, torch.Tensor],
    first_order: bool,
) -> Params:
    """Take ``steps`` gradient steps on ``fast`` (the adapted parameters) for one task.

    ``frozen`` parameters take part in the forward pass but are not adapted (ANIL's body).
    ``step_size`` is a scalar, or one tensor per fast parameter (Meta-SGD's learned rates).
    With ``first_order`` the inner gradients are computed off the outer graph (FOMAML).
    """

    def support_loss(adapted: Params, context: Params, task_inputs: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, {**context, **adapted}, (task_inputs,)), targets)

    for _ in range(steps):
        if inside_task_vmap():  # vmap needs torch.func's transforms
            if first_order:  # nothing the inner gradient is computed from may carry the outer graph
                gradients = grad(support_loss)(_detached(fast), _detached(frozen), inputs.detach())
            else:
                gradients = grad(support_loss)(fast, frozen, inputs)
        else:
            gradients = _autograd_gradients(support_loss, fast, frozen, inputs, first_order)
        fast = {
            name: value - (step_size[name] if isinstance(step_size, Mapping) else step_size) * gradients[name]
            for name, value in fast.items()
        }
    return fast


def _autograd_gradients(support_loss: Callable[[Params, Params, torch.Tensor], torch.Tensor], fast: Params,
                        frozen: Params, inputs: torch.Tensor, first_order: bool) -> Params:
    """The inner gradients of one task by ``torch.autograd.grad``: the same values as ``torch.func.grad``,
    with less overhead per operation in a loop over tasks. Second order keeps their graph
    (``create_graph``) when there is an outer graph to keep; otherwise they are taken off it."""
    keep_graph = not first_order and torch.is_grad_enabled() and any(v.requires_grad for v in fast.values())
    with torch.enable_grad():  # evaluation adapts under Lightning's no_grad
        if not keep_graph:
            fast = {name: value.detach().requires_grad_() for name, value in fast.items()}
            frozen, inputs = _detached(frozen), inputs.detach()
        names = list(fast)
        with differentiated_twice() if keep_graph else contextlib.nullcontext():
            loss = support_loss(fast, frozen, inputs)
        gradients = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=keep_graph, allow_unused=True)
    return {name: torch.zeros_like(fast[name]) if gradient is None else gradient
            for name, gradient in zip(names, gradients)}


def _detached(params: Params) -> Params:
    return {name: value.detach() for name, value in params.items()}


def per_task(function: Callable[..., torch.Tensor], vectorize: bool) -> Callable[..., torch.Tensor]:
    """Apply ``function(*task_tensors)`` to every task of a meta-batch: vmapped, or in a loop.

    All arguments are batched along dimension 0; the per-task outputs are stacked.
    """
    if vectorize:
        vectorized = vmap(function, randomness="same")

        def vmapped(*batched: torch.Tensor) -> torch.Tensor:
            with under_task_vmap():  # fused BatchNorm breaks vmap's second order: see under_task_vmap
                return vectorized(*batched)

        return vmapped

    def looped(*batched: torch.Tensor) -> torch.Tensor:
        return torch.stack([function(*task) for task in zip(*batched)])

    return looped


def task_by_task_meta_loss(task_loss: Callable[[int], tuple[torch.Tensor, torch.Tensor]], tasks: int,
                           parameters: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The meta-loss ``sum_t loss_t``, differentiating and freeing each task's graph before the next task runs.

    ``task_loss(t)`` returns task ``t``'s (already weighted) loss and its outputs. Its meta-gradient
    is taken at once and summed, so only one task's activations are alive at a time -- as in
    learn2learn's loop, and unlike one backward through a stacked meta-batch, whose activations
    (all tasks' query sets) would all be kept. Returned: a loss whose value is the meta-loss and
    whose gradient with respect to ``parameters`` is the summed meta-gradient (a linear surrogate,
    so an ordinary ``backward()`` -- Lightning's included -- fills ``.grad`` exactly), and the
    detached outputs stacked over tasks.
    """
    total = [torch.zeros_like(p) for p in parameters]
    losses, outputs = [], []
    for t in range(tasks):
        loss, task_outputs = task_loss(t)
        for accumulated, gradient in zip(total, torch.autograd.grad(loss, parameters, allow_unused=True)):
            if gradient is not None:
                accumulated.add_(gradient)
        losses.append(loss.detach())
        outputs.append(task_outputs.detach())
    surrogate = sum((p * g).sum() for p, g in zip(parameters, total))
    return surrogate - surrogate.detach() + torch.stack(losses).sum(), torch.stack(outputs)
