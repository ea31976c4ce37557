"""Batched image augmentation on the training device: random crop with zero padding + horizontal flip.

The usual miniImageNet training augmentation (e.g. Lee et al. 2019, "Meta-Learning with
Differentiable Convex Optimization"; Chen et al. 2019, "A Closer Look at Few-shot Classification"):
pad every side with ``padding`` black pixels, cut a random window of the original size, and mirror
it with probability 1/2. Every image draws its own window and flip; all images of a meta-batch are
transformed by two ``gather`` calls, with no Python per image. The random draws come from a CPU
generator (seeded by the caller), so a seed gives the same augmentation on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Randomly cropped (after zero padding) and mirrored copies of ``images [..., C, H, W]``."""
    shape = images.shape
    flat = images.reshape(-1, *shape[-3:])
    count, channels, height, width = flat.shape
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator).to(device)
    mirrored = (torch.rand(count, generator=generator) < 0.5).to(device)
    padded = F.pad(flat, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(height, device=device)                          # [count, H]
    columns = torch.arange(width, device=device).expand(count, width)
    columns = torch.where(mirrored.unsqueeze(1), width - 1 - columns, columns) + offsets[:, 1:]  # [count, W]
    row_index = rows[:, None, :, None].expand(count, channels, height, padded.shape[-1])
    cropped_rows = padded.gather(2, row_index)                                          # [count, C, H, W + 2p]
    column_index = columns[:, None, None, :].expand(count, channels, height, width)
    return cropped_rows.gather(3, column_index).reshape(shape)
