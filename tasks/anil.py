"""ANIL (Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature Reuse? Towards Understanding
the Effectiveness of MAML").

"Almost No Inner Loop": the inner loop adapts only the network's head; the body (all layers before
it) is shared by all tasks and is learned in the outer loop only. Since the body is constant during
adaptation, its features are computed once per task (support and query batches, as MAML's forward
passes are) and the inner steps run on the head alone; the outer gradient still reaches the body
through those features, second order included, exactly as if the whole network were re-run at every
step. Defaults are MAML's 5-way Omniglot ones, which the paper reuses.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from tasks.inner_loop import Params, adapt
from tasks.maml import MAML


def _under(params: Params, prefix: str) -> Params:
    """The entries of ``params`` named ``prefix + name``, keyed by ``name``."""
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


class ANIL(MAML):
    """MAML whose inner loop adapts the head only (see module docstring); the constructor is MAML's."""

    def split_parameters(self) -> tuple[Params, Params]:
        """``(head, body)``: the head is adapted, the body is frozen in the inner loop."""
        parameters = dict(self.network.named_parameters())
        head = {name: value for name, value in parameters.items() if name.startswith("head.")}
        body = {name: value for name, value in parameters.items() if not name.startswith("head.")}
        return head, body

    def task_query_outputs(self, fast: Params, frozen: Params, step_size: float | dict[str, torch.Tensor],
                           support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                           steps: int, first_order: bool) -> torch.Tensor:
        """Body features once, then ``steps`` inner steps on the head; first order cuts the inner gradients
        off the outer graph entirely (the support features they depend on included)."""
        body = _under(frozen, "backbone.")
        support_features = functional_call(self.network.backbone, body, (support_x,))
        query_features = functional_call(self.network.backbone, body, (query_x,))
        if first_order:
            support_features = support_features.detach()
        head_step = _under(step_size, "head.") if isinstance(step_size, dict) else step_size
        adapted = adapt(self.network.head, _under(fast, "head."), {}, support_features, support_y, self.loss_fn,
                        steps, head_step, first_order)
        return functional_call(self.network.head, adapted, (query_features,))
