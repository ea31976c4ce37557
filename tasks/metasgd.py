"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

MAML whose inner step size is not a scalar but a learned tensor of the shape of every adapted
parameter (a per-coordinate learning rate, whose sign also sets the update direction), meta-trained
jointly with the initialisation: ``theta' = theta - alpha * grad``, gradients flowing into both
``theta`` and ``alpha``. The paper uses MAML's Conv-4 and a single adaptation step at training and at
test time, hence ``test_inner_steps=1`` here; ``alpha`` starts at ``inner_lr`` everywhere (the paper
draws it at random from [0.005, 0.1]). Other defaults are MAML's 5-way Omniglot ones.
"""
from __future__ import annotations

import torch
from torch import nn

from tasks.maml import MAML


def _key(parameter_name: str) -> str:
    """Module attribute names may not contain dots: ``backbone.head.weight -> backbone__head__weight``."""
    return parameter_name.replace(".", "__")


class MetaSGD(MAML):
    """MAML with learned per-parameter inner step sizes ``inner_lrs`` (see module docstring)."""

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 in_features: int = 1, problem: str = "classification", lr: float = 1e-3, inner_lr: float = 0.4,
                 inner_steps: int = 1, test_inner_steps: int = 1, first_order: bool = False,
                 vectorize: bool | str = "auto", lr_decay_every: int = 0, lr_decay: float = 0.5) -> None:
        super().__init__(ways=ways, in_channels=in_channels, image_size=image_size, hidden=hidden,
                         in_features=in_features, problem=problem, lr=lr, inner_lr=inner_lr,
                         inner_steps=inner_steps, test_inner_steps=test_inner_steps, first_order=first_order,
                         vectorize=vectorize, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
        fast, _ = self.split_parameters()
        self.inner_lrs = nn.ParameterDict({
            _key(name): nn.Parameter(torch.full_like(value, float(inner_lr))) for name, value in fast.items()
        })

    def step_size(self) -> dict[str, torch.Tensor]:
        """One learned step-size tensor per adapted parameter, keyed by the parameter's name."""
        fast, _ = self.split_parameters()
        return {name: self.inner_lrs[_key(name)] for name in fast}
