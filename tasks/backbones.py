"""Backbones shared by all algorithms.

Conv-4 is the four-block network of Vinyals et al. 2016 (Matching Networks), used unchanged by
Finn et al. 2017 (MAML) and Snell et al. 2017 (Prototypical Networks): each block is a 3x3
convolution with ``hidden`` filters, BatchNorm, ReLU and 2x2 max-pooling.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int, track_running_stats: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


def conv4_output_size(image_size: int, blocks: int = 4) -> int:
    """Spatial side after ``blocks`` conv blocks (each pooling halves, rounding down)."""
    for _ in range(blocks):
        image_size //= 2
    return image_size


class Conv4(nn.Module):
    """Conv-4 feature extractor: ``[B, C, H, W] -> [B, hidden * s * s]`` (flattened).

    ``track_running_stats=False`` makes BatchNorm always use the current batch's statistics, as
    in MAML's reference implementation; it is also what makes the network a pure function of its
    parameters for ``torch.func`` transforms.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 blocks: int = 4, track_running_stats: bool = True) -> None:
        super().__init__()
        channels = [in_channels] + [hidden] * blocks
        self.blocks = nn.Sequential(*[conv_block(channels[i], channels[i + 1], track_running_stats) for i in range(blocks)])
        self.output_dim = hidden * conv4_output_size(image_size, blocks) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images).flatten(1)


class Classifier(nn.Module):
    """A backbone followed by a linear head (the network MAML-family algorithms adapt)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, outputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(inputs))
