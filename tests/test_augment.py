"""Batched photometric augmentation: identity at zero strength, ranges, colour dropping."""

import pytest
import torch

from san_fast.augment import color_augment


def test_zero_strength_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(color_augment(x, 0.0, 0.0), x)


def test_zero_hue_rotation_keeps_colours():
    from san_fast.augment import _rotate_hue

    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(_rotate_hue(x, torch.zeros(2)), x, atol=1e-5)


def test_jitter_changes_images_within_range_and_is_seeded():
    x = torch.rand(6, 3, 16, 16)
    a = color_augment(x, 0.4, 0.0, torch.Generator().manual_seed(1))
    b = color_augment(x, 0.4, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert (a - x).abs().mean() > 1e-3


def test_colour_dropping_gives_gray_images():
    x = torch.rand(5, 3, 4, 4)
    out = color_augment(x, 0.0, 1.0)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        color_augment(torch.rand(3, 4, 4), 0.1, 0.1)
    with pytest.raises(ValueError, match="jitter"):
        color_augment(torch.rand(1, 3, 4, 4), 1.5, 0.1)
