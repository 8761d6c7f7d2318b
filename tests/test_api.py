"""san_fast.load and SAN.segment: layouts, pixel types, any size, errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import san_fast
from san_fast.api import load, read_assignment
from san_fast.runtime import Runtime
from tiny_model import save_checkpoint, smooth_image, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def reference(model, image_hwc: np.ndarray) -> torch.Tensor:
    """model.predict on the image normalised the way training normalises it."""
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, scaler=None)
    x = torch.from_numpy(image_hwc).permute(2, 0, 1)[None]
    return model.predict(runtime.prepare(x))[0]


def test_segment_matches_predict_on_training_sized_input(model):
    image = smooth_image(32, 48)
    expected = reference(model, image)
    assert expected.unique().numel() > 1  # a one-cluster answer would make the checks below weak
    labels = model.segment(image)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.shape == (32, 48)
    assert np.array_equal(labels, expected.numpy())


def test_every_layout_and_pixel_type_gives_the_same_labels(model):
    image = smooth_image(40, 24, seed=1)
    expected = model.segment(image)
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    same = [
        model.segment(tensor).numpy(),                                 # torch (C, H, W) uint8
        model.segment(tensor[None])[0].numpy(),                        # torch (B, C, H, W)
        model.segment(tensor.float() / 255).numpy(),                   # torch float in [0, 1]
        model.segment(image.astype(np.float64) / 255),                 # numpy float
        model.segment(image.astype(np.uint16) * 257),                  # numpy 16-bit
        model.segment(Image.fromarray(image)),                         # PIL
        model.segment(np.concatenate([image, np.full((40, 24, 1), 7, np.uint8)], -1)),  # alpha dropped
        model.segment(np.stack([image, smooth_image(40, 24, 2)]))[0],  # (B, H, W, C)
    ]
    for i, labels in enumerate(same):
        assert np.array_equal(labels, expected), i


def test_gray_is_repeated_to_rgb(model):
    gray = smooth_image(24, 32)[..., 0]
    assert np.array_equal(model.segment(gray), model.segment(np.repeat(gray[..., None], 3, -1)))


def test_any_size_is_padded_and_cropped_back(model):
    image = smooth_image(37, 53, seed=3)
    labels = model.segment(image)
    assert labels.shape == (37, 53)
    # reference: reflect-pad to multiples of 8 (40 x 56), predict, cut the padding off
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    padded = F.pad(x, (0, 3, 0, 3), mode="reflect").round().to(torch.uint8)[0].permute(1, 2, 0)
    assert np.array_equal(labels, reference(model, padded.numpy())[:37, :53].numpy())
    tiny = model.segment(smooth_image(3, 5))  # smaller than one patch: replicated border
    assert tiny.shape == (3, 5) and tiny.min() >= 0 and tiny.max() < model.num_semantics


def test_max_side_segments_smaller_and_resizes_back(model):
    image = smooth_image(96, 64, seed=4)
    labels = model.segment(image, max_side=48)
    assert labels.shape == (96, 64)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    small = F.interpolate(x, size=(48, 32), mode="bilinear", antialias=True, align_corners=False)
    small = (small * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    expected = reference(model, small)
    assert np.array_equal(labels, np.repeat(np.repeat(expected.numpy(), 2, 0), 2, 1))
    assert np.array_equal(model.segment(image, max_side=96), model.segment(image))


def test_list_of_sizes_and_batches_are_split(model):
    images = [smooth_image(32, 32), smooth_image(16, 40, seed=5)]
    out = model.segment(images)
    assert [o.shape for o in out] == [(32, 32), (16, 40)]
    batch = np.stack([smooth_image(24, 24, seed=s) for s in range(5)])
    assert np.array_equal(model.segment(batch, batch_size=2), model.segment(batch, batch_size=5))


def test_segment_restores_training_mode_and_needs_no_grad(model):
    model.train()
    try:
        labels = model.segment(torch.from_numpy(smooth_image(32, 32)).permute(2, 0, 1))
        assert model.training and not labels.requires_grad and labels.dtype == torch.long
    finally:
        model.eval()


@pytest.mark.parametrize("bad, message", [
    (np.full((8, 8, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((8, 8, 3), np.int32), "uint8, uint16 or float"),
    (np.zeros((8, 8, 2), np.uint8), "3-channel"),
    (np.zeros((2, 2, 8, 8, 3), np.uint8), r"\(H, W, C\)"),
    (torch.zeros(8, 8, dtype=torch.uint8), r"\(C, H, W\)"),
    ("image.png", "numpy array"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
])
def test_bad_input_is_a_clear_error(model, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        model.segment(bad)


def test_load_rebuilds_the_model_in_eval_mode(model, tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", model)
    loaded = san_fast.load(path, device="cpu")
    assert san_fast.load is load
    assert not loaded.training and loaded.seat_impl == "torch"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    image = smooth_image(45, 30, seed=6)
    assert np.array_equal(loaded.segment(image), model.segment(image))


def test_load_errors(model, tmp_path):
    with pytest.raises(ValueError, match="missing.pt: no such checkpoint"):
        load(tmp_path / "missing.pt")
    other = tiny_model(embed_dim=24)
    state = {"model": other.state_dict(), "config": model.cfg.to_dict()}
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="does not fit this model"):
        load(tmp_path / "mismatch.pt", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="CUDA is not available"):
            load(save_checkpoint(tmp_path / "c.pt", model), device="cuda")
    with pytest.raises(ValueError, match="--device 'gpu0': expected auto, cpu, cuda or cuda:N"):
        load(save_checkpoint(tmp_path / "c.pt", model), device="gpu0")


def test_read_assignment_takes_clusters_matched_to_no_class(tmp_path):
    names = ["sky", "grass", "road"]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"san": {"assignment": [2, 0, -1, 1, -1]}, "class_names": names}))
    assert read_assignment(path, 5) == ([2, 0, -1, 1, -1], names)  # the strict rule's -1
    for bad in ([2, 0, -2, 1, 0], [2, 0, 3, 1, 0]):
        path.write_text(json.dumps({"assignment": bad, "class_names": names}))
        with pytest.raises(ValueError, match=r"\[0, 3\), or be -1"):
            read_assignment(path, 5)


def test_four_band_model_takes_rgb_plus_infrared():
    model = tiny_model(dataset="potsdam", data_root="unused", potsdam_bands="rgbir")
    rgbir = np.concatenate([smooth_image(32, 40, seed=7), smooth_image(32, 40, seed=8)[..., :1]], -1)
    labels = model.segment(rgbir)
    assert np.array_equal(labels, reference(model, rgbir).numpy())
    assert not np.array_equal(labels, model.segment(np.concatenate([rgbir[..., :3], 0 * rgbir[..., :1]], -1)))
    with pytest.raises(ValueError, match="4-channel images"):
        model.segment(rgbir[..., :3])


@pytest.mark.parametrize("encoder, generator", [("unet", "vit"), ("conv3x3", "unet"), ("resnet18", "resnet18")])
def test_backbone_variants_take_odd_sizes(encoder, generator):
    model = tiny_model(encoder=encoder, generator=generator)
    labels = model.segment(smooth_image(29, 43, seed=9))
    assert labels.shape == (29, 43) and 0 <= labels.min() and labels.max() < model.num_semantics
