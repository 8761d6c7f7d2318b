import numpy as np
import pytest
import torch
from PIL import Image

from san_fast.viz import colorize, label_palette, save_loss_curve, save_prediction_grid


@pytest.mark.parametrize("n", [1, 6, 27, 30, 60])
def test_palette_is_distinct_and_never_black(n):
    pal = label_palette(n)
    assert pal.dtype == np.uint8 and pal.shape == (n, 3)
    assert len({tuple(c) for c in pal}) == n
    assert pal.astype(int).sum(1).min() > 80  # black is reserved for ignored pixels
    if n > 1:
        d = np.linalg.norm(pal[:, None].astype(float) - pal[None].astype(float), axis=-1)
        assert d[~np.eye(n, dtype=bool)].min() > (40 if n <= 30 else 15)


def test_colorize_maps_labels_and_ignored():
    labels = torch.tensor([[0, 1], [255, 2]])
    out = colorize(labels)
    pal = label_palette(3)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert (out[0, 0] == pal[0]).all() and (out[1, 1] == pal[2]).all()
    assert (out[1, 0] == 0).all()
    assert (colorize(np.full((3, 3), 255)) == 0).all()
    with pytest.raises(ValueError, match="integer"):
        colorize(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        colorize(torch.tensor([[-1, 0]]))


def make_batch(b=3, h=32, w=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, 4, (b, h, w), generator=g)
    targets[:, 0] = 255
    return images, targets, (targets.clamp(max=3) + 1) % 4


def test_prediction_grid_written_with_expected_size(tmp_path):
    images, targets, preds = make_batch()
    path = tmp_path / "vis" / "grid.png"
    canvas = save_prediction_grid(path, images, targets, preds,
                                  class_names=["sky", "grass", "road", "car"],
                                  assignment=[3, 0, 1, 2])
    with Image.open(path) as im:
        assert im.size == canvas.size and im.mode == "RGB"
        # 32 px crops are enlarged 4x to 128 px tiles: 3 tiles wide, 3 rows high (+ header, legend)
        assert im.width == 6 + 3 * (128 + 6)
        assert im.height > 3 * (128 + 6)
        pixels = np.asarray(im)
    # through the assignment every prediction matches its target, so the two columns agree,
    # except on the ignored first label row (4 px once enlarged), black in the ground truth only
    top = 22
    gt_tile = pixels[top:top + 128, 6 + 134:6 + 134 + 128]
    pred_tile = pixels[top:top + 128, 6 + 2 * 134:6 + 2 * 134 + 128]
    assert (gt_tile[4:] == pred_tile[4:]).all()
    assert (gt_tile[:4] == 0).all() and (pred_tile[:4] != 0).any()


def test_prediction_grid_without_names_or_assignment(tmp_path):
    images, targets, preds = make_batch(b=1, h=160, w=200)
    canvas = save_prediction_grid(tmp_path / "g.png", images, targets, preds)
    assert canvas.size == (6 + 3 * (200 + 6), 22 + 160 + 6)


def test_prediction_grid_errors(tmp_path):
    images, targets, preds = make_batch()
    with pytest.raises(ValueError, match="uint8"):
        save_prediction_grid(tmp_path / "g.png", images.float(), targets, preds)
    with pytest.raises(ValueError, match="targets and preds"):
        save_prediction_grid(tmp_path / "g.png", images, targets[:, :8], preds)
    with pytest.raises(ValueError, match="assignment"):
        save_prediction_grid(tmp_path / "g.png", images, targets, preds, assignment=[0, 1])
    assert not (tmp_path / "g.png").exists()


def test_loss_curve_written(tmp_path):
    history = {
        "loss": [2.0 / (i + 1) for i in range(500)],
        "uniformity": [0.01] * 20,  # flat series: the y range must not collapse
        "val/acc": [0.2, float("nan"), 0.5],
        "empty": [],
    }
    canvas = save_loss_curve(tmp_path / "curves" / "loss.png", history, title="run")
    with Image.open(tmp_path / "curves" / "loss.png") as im:
        assert im.size == canvas.size
        assert im.height > 4 * 150 and im.width > 500
        pixels = np.asarray(im).astype(int)
    # the first curve is drawn in its (blue) colour somewhere in the first panel
    blue = (abs(pixels - np.array([31, 119, 180])).sum(-1) < 30)
    assert blue[: 26 + 24 + 150].any()


def test_loss_curve_rejects_empty_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        save_loss_curve(tmp_path / "x.png", {})
