"""Batched image augmentation on the training device.

* :func:`random_crop_flip` -- the usual miniImageNet training augmentation (e.g. Lee et al. 2019,
  "Meta-Learning with Differentiable Convex Optimization"; Chen et al. 2019, "A Closer Look at
  Few-shot Classification"): pad every side with ``padding`` black pixels, cut a random window of the
  original size, and mirror it with probability 1/2. Two ``gather`` calls transform a meta-batch.
* :func:`random_affine` -- the affine distortions of Koch et al. 2015 ("Siamese Neural Networks for
  One-shot Image Recognition", "affine distortions") for Omniglot: rotation, shear, scale and translation,
  each drawn per image and each applied with probability 1/2. One ``affine_grid`` + ``grid_sample``.

Every image draws its own parameters, with no Python per image. The random draws come from a CPU
generator (seeded by the caller), so a seed gives the same augmentation on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class AffineRanges:
    """Ranges of Koch et al. 2015's distortions (their 105x105 images; translation as a fraction of the side).

    rotation: degrees in [-rotation, rotation]; shear: in [-shear, shear] along each axis; scale: each
    axis in [1 - scale, 1 + scale]; shift: each axis in [-shift, shift] of the image side (Koch et
    al.: 2 pixels of 105). Each of the four components is applied to an image with probability
    ``probability`` (Koch et al.: 1/2), independently.
    """

    rotation: float = 10.0
    shear: float = 0.3
    scale: float = 0.2
    shift: float = 2 / 105
    probability: float = 0.5

    def __post_init__(self) -> None:
        if not (0 <= self.shear < 1 and 0 <= self.scale < 1 and self.rotation >= 0 and self.shift >= 0
                and 0 <= self.probability <= 1):
            raise ValueError(f"invalid affine ranges {self}: use 0 <= shear < 1, 0 <= scale < 1 (so every "
                             "transform stays invertible), rotation >= 0, shift >= 0 and 0 <= probability <= 1")


def affine_theta(angle: torch.Tensor, shear: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The ``affine_grid`` matrices ``[count, 2, 3]`` of the distortions ``x -> rotation @ shear @ scale @ x + shift``.

    In ``grid_sample``'s normalised coordinates (x right, y down, -1..1 across the image): ``angle``
    ``[count]`` in radians (positive turns x towards y, i.e. clockwise on screen), ``shear`` ``[count, 2]``
    (x += shear_x * y, y += shear_y * x), ``scale`` and ``shift`` ``[count, 2]`` (a shift of 2 is one
    image side). ``grid_sample`` maps output to input coordinates, so this is the inverse transform.
    """
    cos, sin, one = angle.cos(), angle.sin(), torch.ones_like(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.stack([torch.stack([one, shear[:, 0]], -1), torch.stack([shear[:, 1], one], -1)], -2)
    inverse = torch.linalg.inv(rotation @ shearing @ torch.diag_embed(scale))
    return torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], -1)


def random_affine(images: torch.Tensor, generator: torch.Generator,
                  ranges: AffineRanges = AffineRanges()) -> torch.Tensor:
    """Randomly distorted copies of ``images [..., C, H, W]`` (background 0: bilinear, zero fill outside)."""
    shape = images.shape
    flat = images.reshape(-1, *shape[-3:])
    count = flat.shape[0]

    def draw(half_width: float, identity: float, components: int) -> torch.Tensor:
        values = identity + half_width * (2 * torch.rand(count, components, generator=generator) - 1)
        applied = torch.rand(count, 1, generator=generator) < ranges.probability
        return torch.where(applied, values, torch.full_like(values, identity)).double()

    angle = draw(math.radians(ranges.rotation), 0.0, 1)[:, 0]
    shear, scale = draw(ranges.shear, 0.0, 2), draw(ranges.scale, 1.0, 2)
    shift = draw(2 * ranges.shift, 0.0, 2)                  # normalised coordinates: 2 units per image side
    return affine_warp(flat, affine_theta(angle, shear, scale, shift)).reshape(shape)


def affine_warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``images [N, C, H, W]`` resampled through the ``affine_grid`` matrices ``theta [N, 2, 3]`` (bilinear, zero fill)."""
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
