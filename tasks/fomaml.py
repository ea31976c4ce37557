"""First-order MAML (Finn, Abbeel & Levine 2017, Sec. 5.2).

MAML with the second derivatives dropped: the inner-loop gradients are treated as constants, so the
meta-gradient of a task is the query-loss gradient at the adapted parameters. Every other setting
(and default) is MAML's 5-way Omniglot one (:class:`tasks.maml.MAML`).
"""
from __future__ import annotations

from tasks.maml import MAML


class FOMAML(MAML):
    """:class:`tasks.maml.MAML` with ``first_order=True`` by default (the constructor is MAML's)."""

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 in_features: int = 1, problem: str = "classification", lr: float = 1e-3, inner_lr: float = 0.4,
                 inner_steps: int = 1, test_inner_steps: int = 3, first_order: bool = True,
                 vectorize: bool | str = "auto", lr_decay_every: int = 0, lr_decay: float = 0.5) -> None:
        super().__init__(ways=ways, in_channels=in_channels, image_size=image_size, hidden=hidden,
                         in_features=in_features, problem=problem, lr=lr, inner_lr=inner_lr,
                         inner_steps=inner_steps, test_inner_steps=test_inner_steps, first_order=first_order,
                         vectorize=vectorize, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
