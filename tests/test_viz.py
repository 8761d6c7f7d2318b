import numpy as np
import pytest
import torch
from PIL import Image

from san_fast.viz import (UNMATCHED_COLOUR, UNMATCHED_NAME, colorize, confusion_figure, label_palette,
                          loss_curve_figure, overlay_figure, prediction_grid_figure, render,
                          save_confusion_matrix, save_indexed_png, save_loss_curve, save_overlay,
                          save_prediction_grid)


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
    custom = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.uint8)
    assert (colorize(np.array([[2, 0]]), palette=custom) == custom[[2, 0]]).all()
    with pytest.raises(ValueError, match="integer"):
        colorize(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        colorize(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="palette has 3 colours"):
        colorize(np.array([[5]]), palette=custom)


def make_batch(b=3, h=32, w=32, channels=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, channels, h, w), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, 4, (b, h, w), generator=g)
    targets[:, 0] = 255
    return images, targets, (targets.clamp(max=3) + 1) % 4


def panel(fig, row, col):
    return np.asarray(fig.axes[3 * row + col].images[0].get_array())


def test_prediction_grid_tiles_through_the_assignment(tmp_path):
    images, targets, preds = make_batch()
    names = ["sky", "grass", "road", "car", "tree"]
    fig = prediction_grid_figure(images, targets, preds, class_names=names, assignment=[3, 0, 1, 2])
    assert [ax.get_title() for ax in fig.axes[:3]] == ["image", "ground truth", "prediction"]
    for i in range(3):
        assert np.array_equal(panel(fig, i, 0), images[i].permute(1, 2, 0).numpy())
        gt, pred = panel(fig, i, 1), panel(fig, i, 2)
        # through the assignment every prediction matches its target, except on the ignored
        # first row, black in the ground truth only
        assert np.array_equal(gt[1:], pred[1:]) and np.array_equal(gt, colorize(targets[i], 5))
        assert (gt[0] == 0).all() and (pred[0] != 0).any()
    # the legend names the classes shown (not "tree") and the ignored pixels
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["sky", "grass", "road", "car", "ignored"]

    pixels = save_prediction_grid(tmp_path / "vis" / "grid.png", images, targets, preds,
                                  class_names=names, assignment=[3, 0, 1, 2])
    with Image.open(tmp_path / "vis" / "grid.png") as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), pixels)
    # every class colour is in the picture
    for colour in label_palette(4):
        assert (pixels == colour).all(-1).any()


def test_clusters_matched_to_no_class_are_white_and_named(tmp_path):
    # the strict over-clustering rule maps clusters 4 and 5 to no class (-1)
    images, targets, preds = make_batch()
    preds = preds.clone()
    preds[:, -4:] = 4
    preds[0, -2:] = 5
    names = ["sky", "grass", "road", "car"]
    fig = prediction_grid_figure(images, targets, preds, class_names=names, assignment=[3, 0, 1, 2, -1, -1])
    for i in range(3):
        pred = panel(fig, i, 2)
        assert (pred[-4:] == UNMATCHED_COLOUR).all()  # not the last class's colour
        assert not (pred[1:-4] == UNMATCHED_COLOUR).all(-1).any()
        assert np.array_equal(pred[1:-4], panel(fig, i, 1)[1:-4])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == names + ["ignored", UNMATCHED_NAME]


def test_prediction_grid_shows_rgb_of_four_band_and_gray_images(tmp_path):
    images, targets, preds = make_batch(b=2, h=20, w=28, channels=4)
    fig = prediction_grid_figure(images, targets, preds)
    assert fig.axes[2].get_title() == "clusters" and not fig.legends
    assert np.array_equal(panel(fig, 1, 0), images[1, :3].permute(1, 2, 0).numpy())
    gray = prediction_grid_figure(images[:, :1], targets, preds)
    assert np.array_equal(panel(gray, 0, 0), images[0, 0, :, :, None].expand(-1, -1, 3).numpy())
    # without an assignment the legend names only the ground truth's classes
    fig = prediction_grid_figure(images, targets % 2, preds, class_names=["a", "b", "c", "d"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]


def test_prediction_grid_errors(tmp_path):
    images, targets, preds = make_batch()
    with pytest.raises(ValueError, match="uint8"):
        save_prediction_grid(tmp_path / "g.png", images.float(), targets, preds)
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        save_prediction_grid(tmp_path / "g.png", images[:, :2], targets, preds)
    with pytest.raises(ValueError, match="targets and preds"):
        save_prediction_grid(tmp_path / "g.png", images, targets[:, :8], preds)
    with pytest.raises(ValueError, match="assignment"):
        save_prediction_grid(tmp_path / "g.png", images, targets, preds, assignment=[0, 1])
    assert not (tmp_path / "g.png").exists()


def test_loss_curve_counts_epochs_from_one(tmp_path):
    history = {"loss": [3.0, 2.0, 1.5, 1.2, 1.1, 1.0], "val_acc": [0.4, 0.5, 0.6]}
    fig = loss_curve_figure(history, xlabel="epoch", x={"val_acc": [2, 4, 6]})
    loss_ax, acc_ax = fig.axes[:2]
    assert list(loss_ax.lines[0].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(loss_ax.lines[0].get_ydata()) == history["loss"]
    assert list(acc_ax.lines[0].get_xdata()) == [2, 4, 6]
    assert acc_ax.get_xlim() == loss_ax.get_xlim()  # the charts line up
    render(fig)  # ticks are placed when drawn
    ticks = [t for t in loss_ax.get_xticks() if loss_ax.get_xlim()[0] <= t <= loss_ax.get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks) and min(ticks) >= 1
    assert loss_ax.get_xlabel() == "epoch" and loss_ax.get_title(loc="left") == "loss   (last 1)"
    with pytest.raises(ValueError, match="positions"):
        loss_curve_figure(history, x={"val_acc": [1, 2]})


def test_loss_curve_written_with_odd_series(tmp_path):
    history = {
        "loss": [2.0 / (i + 1) for i in range(500)],
        "uniformity": [0.01] * 20,  # flat series
        "val/acc": [0.2, float("nan"), 0.5],  # NaN breaks the line
        "empty": [],
    }
    pixels = save_loss_curve(tmp_path / "curves" / "loss.png", history, title="run")
    with Image.open(tmp_path / "curves" / "loss.png") as im:
        assert np.array_equal(np.asarray(im), pixels)
    fig = loss_curve_figure(history)
    assert len(fig.axes) == 4 and "no finite values" in [t.get_text() for t in fig.axes[3].texts]
    with pytest.raises(ValueError, match="empty"):
        save_loss_curve(tmp_path / "x.png", {})


def test_confusion_matrix_is_row_normalised_by_ground_truth(tmp_path):
    # metrics' matched matrix: rows predicted class, columns ground truth; class 2 has no pixels
    matched = np.array([[8, 1, 0], [2, 3, 0], [0, 0, 0]])
    fig = confusion_figure(matched, ["sky", "grass", "road"])
    shown = fig.axes[0].images[0].get_array()
    assert np.allclose(shown[0].filled(np.nan), [80, 20, 0])  # % of each ground-truth class
    assert np.allclose(shown[1].filled(np.nan), [25, 75, 0])
    assert shown.mask[2].all()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["sky", "grass", "road (no pixels)"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["sky", "grass", "road"]
    assert {t.get_text() for t in fig.axes[0].texts} == {"80", "20", "0", "25", "75"}
    pixels = save_confusion_matrix(tmp_path / "confusion.png", matched, ["sky", "grass", "road"])
    assert pixels.shape[2] == 3 and (tmp_path / "confusion.png").exists()
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        confusion_figure(matched, ["a", "b"])


def test_confusion_matrix_counts_unmatched_pixels_in_a_last_column():
    # strict over-clustering: per ground-truth class, pixels of clusters matched to no class
    matched = np.array([[6, 1], [2, 3]])
    fig = confusion_figure(matched, ["sky", "grass"], unmatched=[2, 4])
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (2, 3)
    assert np.allclose(shown[0], [60, 20, 20]) and np.allclose(shown[1], [12.5, 37.5, 50])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["sky", "grass", UNMATCHED_NAME]
    assert confusion_figure(matched, ["sky", "grass"], unmatched=[0, 0]).axes[0].images[0].get_array().shape == (2, 2)


def test_overlay_blends_and_names_what_is_present(tmp_path):
    image = np.full((10, 20, 3), 200, np.uint8)
    labels = np.zeros((10, 20), np.int64)
    labels[:, 15:] = 2
    palette = label_palette(3)
    fig = overlay_figure(image, labels, palette, ["sky", "grass", "road"], alpha=0.5)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["sky  75.0%", "road  25.0%"]
    blended = np.asarray(fig.axes[1].images[0].get_array())
    assert blended.shape == (128, 256, 3)  # small images are enlarged to a readable size
    assert np.abs(blended[0, 0].astype(int) - (200 + palette[0].astype(int)) / 2).max() <= 1
    assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array())[5, 5], image[0, 0])
    save_overlay(tmp_path / "o.png", image, labels, palette, ["sky", "grass", "road"])
    with pytest.raises(ValueError, match=r"labels must be \(H, W\)"):
        overlay_figure(image, labels[:5], palette, ["a", "b", "c"])


def test_indexed_png_keeps_ids_and_palette(tmp_path):
    labels = np.array([[0, 1, 2], [2, 1, 0]])
    palette = label_palette(3)
    save_indexed_png(tmp_path / "m.png", labels, palette)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P" and np.array_equal(np.asarray(im), labels)
        assert np.array_equal(np.asarray(im.convert("RGB")), palette[labels])
    with pytest.raises(ValueError, match="0..255"):
        save_indexed_png(tmp_path / "x.png", np.array([[256]]), palette)
