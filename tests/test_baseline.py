
import pytest
import torch
from torch.utils.data import Dataset

from san_fast.baseline import kmeans, kmeans_pixel_baseline
from san_fast.data.synthetic import SyntheticScenes

COLOURS = torch.tensor([[220, 30, 30], [30, 200, 40], [40, 60, 230], [240, 240, 240]],
                       dtype=torch.uint8)


class FlatColours(Dataset):
    """Random 4x4-pixel blocks of 4 classes, each a distinct flat colour plus slight noise."""

    def __init__(self, length, seed):
        self.length, self.seed = length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        label = torch.randint(0, 4, (4, 4), generator=g)
        label = label.repeat_interleave(4, 0).repeat_interleave(4, 1)
        image = COLOURS[label].permute(2, 0, 1).short()
        image = image + torch.randint(-5, 6, image.shape, generator=g)
        label[0, 0] = 255  # an ignored pixel, as real datasets have
        return image.clamp(0, 255).to(torch.uint8), label


def test_flat_colours_are_solved():
    result = kmeans_pixel_baseline(FlatColours(40, 0), FlatColours(10, 1), num_clusters=4)
    assert result["method"] == "kmeans-pixels"
    assert result["acc"] > 0.99 and result["miou"] > 0.98
    assert result["num_pixels"] == 10 * 255


def test_seeded_runs_are_deterministic():
    train, val = SyntheticScenes(4, 32, 40, 0), SyntheticScenes(4, 32, 8, 0, split="val")
    a = kmeans_pixel_baseline(train, val, 4, max_pixels=5000, seed=1)
    b = kmeans_pixel_baseline(train, val, 4, max_pixels=5000, seed=1)
    assert a == b
    assert a["train_pixels"] == 5000


def test_more_clusters_than_classes():
    result = kmeans_pixel_baseline(FlatColours(20, 0), FlatColours(5, 1), num_clusters=6,
                                   num_classes=4)
    assert len(result["assignment"]) == 6 and result["acc"] > 0.99


class FourBands(FlatColours):
    """Classes 2 and 3 share their RGB colour and differ in the 4th (infrared) band."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        rgb = image.clone()
        rgb[:, label == 3] = COLOURS[2].view(3, 1).to(torch.uint8)
        ir = torch.where(label == 3, 230, 20).to(torch.uint8)[None]
        return torch.cat([rgb, ir]), label


class Relabelled(FlatColours):
    """The same colours, each under the next class id."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return image, torch.where(label == 255, label, (label + 1) % 4)


def test_the_infrared_band_is_clustered_too():
    result = kmeans_pixel_baseline(FourBands(40, 0), FourBands(10, 1), num_clusters=4)
    assert result["acc"] > 0.99  # classes 2 and 3 are told apart by IR alone


def test_a_held_out_plan_applies_the_matching_fitted_on_other_images():
    own = kmeans_pixel_baseline(FlatColours(20, 0), Relabelled(5, 1), 4)
    assert own["acc"] > 0.99  # fitted on the relabelled images themselves
    held = kmeans_pixel_baseline(FlatColours(20, 0), FlatColours(5, 2), 4, score_dataset=Relabelled(5, 1))
    assert held["acc"] < 0.01 and held["num_pixels"] == own["num_pixels"]  # the matching of FlatColours
    strict = kmeans_pixel_baseline(FlatColours(20, 0), FlatColours(5, 1), num_clusters=6, num_classes=4,
                                   overcluster="strict")
    assert strict["overcluster"] == "strict" and strict["left_out"] + strict["num_pixels"] == 5 * 255


def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = (centres[:, None] + 0.1 * torch.randn(3, 100, 2, generator=g)).reshape(-1, 2)
    found, inertia = kmeans(x, 3, seed=0)
    assert torch.cdist(centres, found).min(1).values.max() < 0.1
    assert inertia < 0.05
    with pytest.raises(ValueError, match="at least k=3"):
        kmeans(x[:2], 3)


def test_empty_training_set_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        kmeans_pixel_baseline(FlatColours(0, 0), FlatColours(2, 1), 4)


def test_synthetic_default_leaves_room_for_a_model():
    # The default synthetic setting of the cpu preset: 6 classes, 64x64, 1024 train / 128 val.
    train, val = SyntheticScenes(6, 64, 1024, 0), SyntheticScenes(6, 64, 128, 0, split="val")
    result = kmeans_pixel_baseline(train, val, 6)
    assert 0.2 < result["acc"] < 0.8
    assert result["clusters_used"] == 6


def test_random_crops_are_drawn_from_the_seed_not_the_callers_stream():
    from san_fast.config import Config
    from san_fast.data import build_dataset

    cfg = Config(synthetic_classes=4, synthetic_train_size=8, synthetic_val_size=4, crop_size=16,
                 synthetic_image_size=32)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")  # random 16x16 crops
    torch.manual_seed(1)
    a = kmeans_pixel_baseline(train, val, 4, max_pixels=1000, seed=3)
    torch.manual_seed(2)
    assert kmeans_pixel_baseline(train, val, 4, max_pixels=1000, seed=3) == a
    # nor on the worker processes that load them (each item has its own seed)
    assert kmeans_pixel_baseline(train, val, 4, max_pixels=1000, seed=3, num_workers=2) == a
    assert kmeans_pixel_baseline(train, val, 4, max_pixels=1000, seed=4) != a
