"""Batched photometric augmentation: identity at zero strength, ranges, colour dropping,
torchvision's hue semantics checked against colorsys, and Potsdam's IR channel left alone."""

import colorsys

import numpy as np
import pytest
import torch

from san_fast.augment import color_augment, hsv_to_rgb, rgb_to_hsv, shift_hue

# A few pixels covering every hue sector, ties between channels, gray and black.
PIXELS = [(0.9, 0.2, 0.1), (0.3, 0.8, 0.2), (0.1, 0.4, 0.7), (0.6, 0.6, 0.1), (0.5, 0.1, 0.5),
          (0.2, 0.7, 0.7), (0.4, 0.4, 0.4), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.25, 0.05, 0.15)]


def as_image(pixels):
    return torch.tensor(pixels, dtype=torch.float64).t().reshape(1, 3, 1, len(pixels))


def test_zero_strength_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(color_augment(x, 0.0, 0.0), x)


def test_hsv_round_trip_and_colorsys_agree():
    x = as_image(PIXELS)
    hsv = rgb_to_hsv(x)
    expected = [colorsys.rgb_to_hsv(*p) for p in PIXELS]
    assert np.allclose(hsv[0, :, 0].t().numpy(), expected, atol=1e-12)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-12)


@pytest.mark.parametrize("turns", [0.1, -0.1, 0.25, -0.5, 0.5, 0.037])
def test_hue_shift_is_a_fraction_of_a_turn_as_torchvision(turns):
    """torchvision's adjust_hue(img, h): HSV hue + h (mod 1); computed independently with
    colorsys on each pixel."""
    x = as_image(PIXELS)
    got = shift_hue(x, torch.tensor([turns], dtype=torch.float64))[0, :, 0].t().numpy()
    for (r, g, b), out in zip(PIXELS, got):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        assert np.allclose(out, colorsys.hsv_to_rgb((h + turns) % 1.0, s, v), atol=1e-9)


def test_iic_hue_setting_rotates_by_up_to_a_tenth_of_a_turn():
    # jitter 0.1 (IIC's Potsdam hue 0.1): each image's hue moves by at most 0.1 turn (36 deg),
    # and some images move by more than the old 0.05 turn (0.1*pi).
    g = torch.Generator().manual_seed(0)
    x = as_image([(0.5, 0.2, 0.15)]).expand(200, 3, 1, 1).contiguous().float()
    out = color_augment(x, 0.1, 0.0, g)
    hue_in = rgb_to_hsv(x)[:, 0].double()
    # brightness, contrast and saturation do not move the hue of a one-pixel image that stays
    # clear of the [0, 1] clamps
    moved = torch.remainder(rgb_to_hsv(out)[:, 0].double() - hue_in + 0.5, 1.0) - 0.5
    assert moved.abs().max() <= 0.1 + 1e-4
    assert moved.abs().max() > 0.07 and moved.min() < 0 < moved.max()


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


def test_ir_channel_is_neither_jittered_nor_dropped():
    x = torch.rand(5, 4, 6, 6)
    g = torch.Generator().manual_seed(3)
    out = color_augment(x, 0.4, 1.0, g)
    assert out.shape == x.shape
    assert torch.equal(out[:, 3], x[:, 3])
    assert torch.allclose(out[:, 0], out[:, 1])  # RGB dropped to gray
    # the RGB part is augmented exactly as a 3-channel batch with the same draws
    same = color_augment(x[:, :3], 0.4, 1.0, torch.Generator().manual_seed(3))
    assert torch.allclose(out[:, :3], same)


def test_channels_last_is_kept():
    x = torch.rand(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    out = color_augment(x, 0.2, 0.5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(B,3,H,W\) or \(B,4,H,W\)"):
        color_augment(torch.rand(3, 4, 4), 0.1, 0.1)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\) or \(B,4,H,W\)"):
        color_augment(torch.rand(1, 5, 4, 4), 0.1, 0.1)
    with pytest.raises(ValueError, match="jitter"):
        color_augment(torch.rand(1, 3, 4, 4), 1.5, 0.1)
