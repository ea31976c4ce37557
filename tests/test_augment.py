"""Koch et al. 2015's affine distortions (datamodules.augment.random_affine): the geometry of the
transform, the probability of each component, determinism, and one batched op sequence per call."""
from __future__ import annotations

import math

import pytest
import torch

from datamodules.augment import AffineRanges, affine_theta, affine_warp as warp, random_affine
from datamodules.episodes import seeded_generator

SIZE = 12


def one_transform(angle: float = 0.0, shear=(0.0, 0.0), scale=(1.0, 1.0), shift=(0.0, 0.0)) -> torch.Tensor:
    as_row = lambda values: torch.tensor([values], dtype=torch.float64)
    return affine_theta(torch.tensor([angle], dtype=torch.float64), as_row(shear), as_row(scale), as_row(shift))


def test_quarter_turn_and_whole_pixel_shift_move_pixels_exactly():
    image = torch.rand(1, 1, SIZE, SIZE)
    identity = warp(image, one_transform())
    assert torch.allclose(identity, image, atol=1e-6)
    turned = warp(image, one_transform(angle=math.pi / 2))          # clockwise on screen
    assert torch.allclose(turned, torch.rot90(image, -1, dims=(-2, -1)), atol=1e-5)
    shifted = warp(image, one_transform(shift=(2 * 3 / SIZE, 0.0)))  # 3 pixels to the right
    expected = torch.zeros_like(image)
    expected[..., 3:] = image[..., :-3]
    assert torch.allclose(shifted, expected, atol=1e-5)


def test_scale_and_shear_act_as_documented():
    square = torch.zeros(1, 1, SIZE, SIZE)
    square[..., 4:8, 4:8] = 1.0
    doubled = warp(square, one_transform(scale=(2.0, 1.0)))        # twice as wide, same height
    width_of_each_row = doubled[0, 0].sum(1)
    assert torch.allclose(width_of_each_row[4:8], torch.full((4,), 8.0)) and width_of_each_row[[3, 8]].abs().max() < 1e-5
    sheared = warp(square, one_transform(shear=(0.5, 0.0)))       # x += 0.5 y: lower rows move right
    top, bottom = sheared[0, 0, 4].argmax(), sheared[0, 0, 7].argmax()
    assert bottom > top


def test_each_component_is_applied_with_its_probability():
    image = torch.rand(4000, 1, SIZE, SIZE)
    never = random_affine(image, seeded_generator(0), AffineRanges(probability=0.0))
    assert torch.allclose(never, image, atol=1e-6)
    changed = (random_affine(image, seeded_generator(0)) - image).abs().amax((1, 2, 3)) > 1e-4
    # untouched only when none of the four components is drawn: 1/16 of the images
    assert abs(1 - changed.float().mean().item() - 1 / 16) < 0.015


def test_same_generator_seed_gives_the_same_distortions_on_any_batch_shape():
    images = torch.rand(3, 5, 2, 1, SIZE, SIZE)
    first = random_affine(images, seeded_generator(7))
    assert first.shape == images.shape
    assert torch.equal(first, random_affine(images, seeded_generator(7)))
    assert torch.equal(first.flatten(0, 2), random_affine(images.flatten(0, 2), seeded_generator(7)))
    assert not torch.equal(first, random_affine(images, seeded_generator(8)))


def test_invalid_ranges_name_the_fix():
    with pytest.raises(ValueError, match="0 <= shear < 1"):
        AffineRanges(shear=1.5)
    with pytest.raises(ValueError, match="0 <= probability <= 1"):
        AffineRanges(probability=2.0)


def test_affine_augmentation_is_batched_no_python_per_image(count_ops):
    images = {batch: torch.rand(batch, 20, 2, 1, SIZE, SIZE) for batch in (1, 64)}
    counts = [count_ops(lambda: random_affine(images[batch], seeded_generator(0))) for batch in images]
    assert counts[0] == counts[1]
