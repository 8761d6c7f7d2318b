"""Runtime.prepare: uint8 RGB or RGB + IR batches to normalised float on the run's device."""

import pytest
import torch

from san_fast.runtime import IR_MEAN, IR_STD, MEAN, STD, Runtime


def cpu_runtime(channels_last=False):
    return Runtime(torch.device("cpu"), None, channels_last, None)


def test_rgb_is_normalised_with_imagenet_statistics():
    images = torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8)
    x = cpu_runtime().prepare(images)
    want = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(x, want)


def test_rgbir_normalises_ir_with_the_mean_rgb_statistics():
    images = torch.randint(0, 256, (2, 4, 5, 6), dtype=torch.uint8)
    x = cpu_runtime(channels_last=True).prepare(images)
    assert x.shape == (2, 4, 5, 6) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[:, 3], (images[:, 3].float() / 255 - IR_MEAN) / IR_STD)
    assert torch.allclose(x[:, :3], cpu_runtime().prepare(images[:, :3]))
    assert IR_MEAN == pytest.approx(0.449) and IR_STD == pytest.approx(0.226)


def test_augmentation_leaves_ir_alone():
    images = torch.randint(0, 256, (4, 4, 5, 6), dtype=torch.uint8)
    torch.manual_seed(0)
    x = cpu_runtime().prepare(images, jitter=0.4, drop=1.0)
    assert torch.allclose(x[:, 3], (images[:, 3].float() / 255 - IR_MEAN) / IR_STD)
    assert torch.allclose(x[:, 0] * STD[0] + MEAN[0], x[:, 1] * STD[1] + MEAN[1], atol=1e-5)


@pytest.mark.parametrize("images", [torch.zeros(2, 5, 4, 4, dtype=torch.uint8),
                                    torch.zeros(2, 3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.uint8)])
def test_bad_input(images):
    with pytest.raises(ValueError, match=r"uint8 images \(B,3,H,W\) or \(B,4,H,W\)"):
        cpu_runtime().prepare(images)
