
import numpy as np
import pytest
import torch

from san_fast.config import Config
from san_fast.data import build_dataset
from san_fast.data.synthetic import TEXTURES, SyntheticScenes, class_names, material


def test_items_have_the_dataset_contract():
    ds = SyntheticScenes(6, 32, 5, seed=0)
    assert len(ds) == 5
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label.dtype == torch.int64 and label.shape == (32, 32)
    assert 0 <= int(label.min()) and int(label.max()) < 6


def test_deterministic_per_seed_split_and_index():
    a = SyntheticScenes(6, 32, 4, seed=3)
    b = SyntheticScenes(6, 32, 4, seed=3)
    for i in (0, 3):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert torch.equal(a[-1][0], a[3][0])
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticScenes(6, 32, 4, seed=4)[0][0])
    assert not torch.equal(a[0][0], SyntheticScenes(6, 32, 4, seed=3, split="val")[0][0])


def test_cache_returns_the_same_items():
    ds = SyntheticScenes(4, 16, 2, seed=0, cache=True)
    assert ds.scene(1) is ds.scene(1)
    assert torch.equal(ds[1][0], SyntheticScenes(4, 16, 2, seed=0)[1][0])


def test_build_from_config_uses_sizes_and_disjoint_splits():
    cfg = Config(synthetic_classes=5, synthetic_train_size=7, synthetic_val_size=3, crop_size=24)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 7 and len(val) == 3
    assert train[0][0].shape == (3, 24, 24) and val[0][1].shape == (24, 24)
    assert not torch.equal(train[0][0], val[0][0])


def with_scene_size(cfg, size):
    # synthetic_image_size: the scene side when it differs from crop_size (requested Config field)
    cfg.synthetic_image_size = size
    return cfg


def test_paper_crops_of_larger_scenes_train_and_whole_scenes_evaluate():
    cfg = with_scene_size(Config(synthetic_train_size=4, synthetic_val_size=2, crop_size=32), 64)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    torch.manual_seed(0)
    image, label = train[1]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32) and label.dtype == torch.int64
    assert val[0][0].shape == (3, 64, 64)
    scene, labels = train.scene(1)
    # a window of the scene at its own scale, no flip (the paper flips Potsdam only)
    windows = [(t, l) for t in range(33) for l in range(33)
               if np.array_equal(scene[:, t:t + 32, l:l + 32], image.numpy())]
    assert len(windows) == 1
    t, l = windows[0]
    assert np.array_equal(labels[t:t + 32, l:l + 32], label.numpy())
    torch.manual_seed(1)
    assert not torch.equal(train[1][0], image)  # another draw, another window


def test_resized_crops_shrink_the_scene():
    cfg = with_scene_size(Config(synthetic_train_size=2, crop_size=32, train_crop="resized"), 64)
    image, label = build_dataset(cfg, "train")[0]
    assert image.shape == (3, 32, 32) and set(label.unique().tolist()) <= set(range(6))


def test_scene_size_errors():
    with pytest.raises(ValueError, match="smaller than crop_size"):
        build_dataset(with_scene_size(Config(crop_size=64), 32), "val")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_dataset(with_scene_size(Config(crop_size=64), 68), "val")


@pytest.mark.parametrize("num_classes", [2, 3, 27, 30])
def test_any_class_count_covers_all_classes(num_classes):
    ds = SyntheticScenes(num_classes, 32, 200, seed=0)
    seen = torch.zeros(num_classes, dtype=torch.bool)
    for i in range(len(ds)):
        seen[ds[i][1].unique()] = True
    assert seen.all()


def test_scenes_have_several_regions():
    ds = SyntheticScenes(6, 64, 50, seed=0)
    counts = [len(ds[i][1].unique()) for i in range(len(ds))]
    assert min(counts) >= 1 and max(counts) >= 3
    assert sum(c >= 2 for c in counts) >= 40


def test_materials_pair_colours_but_differ_in_texture():
    from san_fast.data.synthetic import _PAIR_COLOUR_DELTA

    for g in range(5):
        a, b = material(2 * g), material(2 * g + 1)
        assert abs(a.mean - b.mean).max() <= 2 * _PAIR_COLOUR_DELTA + 1e-6  # one base colour
        assert a.texture != b.texture
    assert {material(k).texture for k in range(len(TEXTURES))} == set(TEXTURES)


def test_class_names_are_unique_and_stable():
    names = class_names(30)
    assert len(set(names)) == 30
    assert class_names(6) == names[:6]
    assert SyntheticScenes(6, 16, 1, 0).class_names == names[:6]


def test_errors():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticScenes(1, 32, 4, 0)
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes(3, 32, 4, 0, split="test")
    with pytest.raises(IndexError):
        SyntheticScenes(3, 32, 4, 0)[4]
