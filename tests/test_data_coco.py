"""COCO-Stuff loaders on tiny fixtures written in STEGO's layout (cocostuff/images, annotations,
curated). The writers here are reused by tests/test_data_prepare.py."""

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from san_fast.config import Config
from san_fast.data import build_dataset, coco
from san_fast.data._io import DatasetFileError, DatasetLayoutError
from san_fast.data.transforms import RandomResizedCropFlip

PERSON, GRASS, SKY_OTHER, TREE = 0, 123, 156, 168  # fine ids (labels.txt id - 1)


def save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def fine_label(h, w):
    """Left half person (coarse 9), right half sky-other (23) over grass (22), a void row."""
    label = np.full((h, w), PERSON, np.uint8)
    label[: h // 2, w // 2:] = SKY_OTHER
    label[h // 2:, w // 2:] = GRASS
    label[h // 2, :] = 255
    return label


def photo_like(rng, h, w):
    """A seeded image with the statistics JPEG is made for (smooth colour, texture in the
    brightness): a one-pixel shift changes it a lot, JPEG q95 barely does (uniform noise, or
    fine texture in the colours that JPEG subsamples, would be the reverse)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, period, phase = rng.uniform(0, np.pi), rng.uniform(6, 12), rng.uniform(0, 6)
    texture = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    colour = rng.uniform(70, 180, 3) + 30 * (x / w - 0.5)[:, :, None] * rng.uniform(-1, 1, 3)
    return np.clip(colour + 50 * texture[:, :, None], 0, 255).astype(np.uint8)


def make_coco(root, ids=None, size=(48, 64), lists=(coco.LIST_27, coco.LIST_3), label_fn=fine_label):
    """Writes <root>/cocostuff with the given ids per split dir; returns the cocostuff folder."""
    ids = ids or {"train2017": ["000000000009", "000000000025", "000000000030"],
                  "val2017": ["000000000139", "000000000285"]}
    base = os.path.join(root, "cocostuff")
    rng = np.random.default_rng(0)
    h, w = size
    for split_dir, split_ids in ids.items():
        for i in split_ids:
            image = photo_like(rng, h, w)
            save(os.path.join(base, "images", split_dir, i + ".jpg"), image, quality=90)
            save(os.path.join(base, "annotations", split_dir, i + ".png"), label_fn(h, w))
        for list_name in lists:
            path = os.path.join(base, "curated", split_dir, list_name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("".join(i + "\n" for i in split_ids))
    return base


def cfg_for(root, dataset="coco27", protocol="picie", crop=32, **extra):
    cfg = Config(dataset=dataset, data_root=str(root), crop_size=crop, eval_protocol=protocol)
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


def test_train_items_are_uint8_crops_with_int64_labels(tmp_path):
    make_coco(tmp_path)
    ds = build_dataset(cfg_for(tmp_path, crop=32), "train")
    assert len(ds) == 3
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label.dtype == torch.int64 and label.shape == (32, 32)
    assert set(label.unique().tolist()) <= {9, 22, 23, 255}


@pytest.mark.parametrize("dataset,expected", [
    ("coco27", (9, 23, 22)),
    ("coco15", (255, 11, 10)),
    ("coco3", (255, 0, 1)),
])
def test_picie_val_maps_labels_and_crops_320(tmp_path, dataset, expected):
    make_coco(tmp_path)
    ds = build_dataset(cfg_for(tmp_path, dataset), "val")
    assert len(ds) == 2
    image, label = ds[1]
    assert image.shape == (3, 320, 320) and label.shape == (320, 320)
    left, top_right, bottom_right = expected
    assert label[0, 0] == left and label[0, -1] == top_right and label[-1, -1] == bottom_right
    assert (label[160] == 255).any() or (label[159] == 255).any()  # the void row survives


def test_iic_val_prescales_and_crops_128(tmp_path):
    make_coco(tmp_path, size=(480, 640))
    ds = build_dataset(cfg_for(tmp_path, "coco15", "iic"), "val")
    image, label = ds[0]
    assert image.shape == (3, 128, 128) and label.shape == (128, 128)
    assert set(label.unique().tolist()) <= {255, 10, 11}


def test_iic_pads_small_images_with_ignored_labels(tmp_path):
    make_coco(tmp_path, size=(360, 380))  # 0.33 * 360 = 119 < 128: IIC pads
    image, label = build_dataset(cfg_for(tmp_path, "coco27", "iic"), "val")[0]
    assert image.shape == (3, 128, 128)
    assert (label[:4] == 255).all() and (image[:, :4] == 0).all()


def test_curated_list_selects_images(tmp_path):
    base = make_coco(tmp_path)
    with open(os.path.join(base, "curated", "train2017", coco.LIST_27), "w") as f:
        f.write("000000000025\n\n000000000030.jpg\n")
    ds = build_dataset(cfg_for(tmp_path), "train")
    assert [os.path.basename(p.image) for p in ds.samples] == ["000000000025.jpg", "000000000030.jpg"]


def test_data_root_may_point_at_the_cocostuff_folder(tmp_path):
    base = make_coco(tmp_path)
    assert len(build_dataset(cfg_for(base), "val")) == 2


def test_items_pickle_for_workers_and_load_in_a_dataloader(tmp_path):
    make_coco(tmp_path)
    ds = build_dataset(cfg_for(tmp_path), "val")
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], ds[0][0])
    loader = torch.utils.data.DataLoader(build_dataset(cfg_for(tmp_path), "train"), batch_size=3,
                                         num_workers=2)
    images, labels = next(iter(loader))
    assert images.shape == (3, 3, 32, 32) and labels.shape == (3, 32, 32)


def test_training_crops_are_reproducible_given_a_seed(tmp_path):
    make_coco(tmp_path)
    ds = build_dataset(cfg_for(tmp_path), "train")
    torch.manual_seed(5)
    first = ds[0]
    torch.manual_seed(5)
    second = ds[0]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    step = RandomResizedCropFlip(16)
    draws = {step.sample(48, 64, torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(draws) > 10
    assert step.sample(48, 64, torch.Generator().manual_seed(3)) == step.sample(
        48, 64, torch.Generator().manual_seed(3))


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    base = make_coco(tmp_path)
    save(os.path.join(base, "images", "val2017", "000000000139.jpg"),
         np.full((48, 64), 77, np.uint8))
    image, _ = build_dataset(cfg_for(tmp_path), "val")[0]
    assert image.shape == (3, 320, 320)
    assert abs(int(image[0, 100, 100]) - 77) <= 2 and torch.equal(image[0], image[2])


def test_missing_dataset_folder_names_the_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset(cfg_for(tmp_path), "train")
    message = str(err.value)
    assert f"COCO-Stuff-164k not found at {tmp_path / 'cocostuff'}" in message
    assert "expected layout:" in message and "annotations/train2017" in message
    assert isinstance(err.value, FileNotFoundError)


def test_missing_split_folder(tmp_path):
    base = make_coco(tmp_path)
    os.rename(os.path.join(base, "images", "val2017"), os.path.join(base, "images", "v"))
    with pytest.raises(DatasetLayoutError, match="val2017.*expected layout"):
        build_dataset(cfg_for(tmp_path), "val")


def test_missing_curated_list_points_at_prepare(tmp_path):
    make_coco(tmp_path, lists=(coco.LIST_27,))
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset(cfg_for(tmp_path, "coco3"), "train")
    message = str(err.value)
    assert coco.LIST_3 in message and "expected layout" in message
    assert "python -m san_fast.data.prepare coco3" in message


def test_image_without_label(tmp_path):
    base = make_coco(tmp_path)
    os.remove(os.path.join(base, "annotations", "train2017", "000000000025.png"))
    with pytest.raises(DatasetLayoutError, match="(?s)images without a label.*annotations/train2017/000000000025.png"):
        build_dataset(cfg_for(tmp_path), "train")


def test_listed_image_missing(tmp_path):
    base = make_coco(tmp_path)
    os.remove(os.path.join(base, "images", "val2017", "000000000285.jpg"))
    with pytest.raises(DatasetLayoutError, match="listed images not found"):
        build_dataset(cfg_for(tmp_path), "val")


def test_label_values_out_of_range(tmp_path):
    def bad_label(h, w):
        label = fine_label(h, w)
        label[0, 0] = 200
        return label

    make_coco(tmp_path, label_fn=bad_label)
    ds = build_dataset(cfg_for(tmp_path), "val")
    with pytest.raises(DatasetFileError, match=r"000000000139.png: values 200 out of range"):
        ds[0]


def test_corrupt_jpeg(tmp_path):
    base = make_coco(tmp_path)
    with open(os.path.join(base, "images", "val2017", "000000000139.jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    with pytest.raises(DatasetFileError, match="cannot decode image .*000000000139.jpg"):
        build_dataset(cfg_for(tmp_path), "val")[0]


def test_rgb_label_png_is_refused(tmp_path):
    base = make_coco(tmp_path)
    save(os.path.join(base, "annotations", "val2017", "000000000139.png"),
         np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(DatasetFileError, match="single-channel"):
        build_dataset(cfg_for(tmp_path), "val")[0]


def test_label_and_image_sizes_must_agree(tmp_path):
    base = make_coco(tmp_path)
    save(os.path.join(base, "annotations", "val2017", "000000000139.png"), fine_label(40, 64))
    with pytest.raises(DatasetFileError, match="is 64x48 but its label"):
        build_dataset(cfg_for(tmp_path), "val")[0]


def test_stale_cache_manifest_is_ignored_with_a_warning(tmp_path):
    make_coco(tmp_path)
    folder = tmp_path / "san_fast_cache" / "cocostuff" / "picie" / "val2017"
    folder.mkdir(parents=True)
    (folder / f"manifest-{coco.LIST_27}.json").write_text('{"format": 0}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(cfg_for(tmp_path), "val")
    assert ds.source.endswith("cocostuff") and any("stale cache" in str(w.message) for w in caught)


# --- the protocols' resampling, checked against the peers' arithmetic -------------------------

def test_resize_short_side_sizes_follow_torchvision():
    from san_fast.data.transforms import ResizeShortSide

    step = ResizeShortSide(320)
    assert step.output_size(480, 640) == (320, 426)  # COCO landscape: int(320 * 640 / 480)
    assert step.output_size(640, 427) == (479, 320)
    assert step.output_size(1024, 2048) == (320, 640)  # Cityscapes


def test_iic_rescale_is_cv2_inter_linear():
    from san_fast.data.transforms import Rescale

    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2) * 10
    label = np.arange(16, dtype=np.uint8).reshape(4, 4)
    out_image, out_label = Rescale(0.5)(image, label)
    # cv2.resize(fx=0.5, INTER_LINEAR) averages each 2x2 block; INTER_NEAREST takes its top left
    assert out_image[:, :, 0].tolist() == [[25, 45], [105, 125]]
    assert out_label.tolist() == [[0, 2], [8, 10]]
    assert Rescale(0.33).output_size(480, 640) == (158, 211)


def test_centre_crop_offsets():
    from san_fast.data.transforms import CentreCrop

    image = np.zeros((5, 7, 3), np.uint8)
    label = np.arange(35, dtype=np.uint8).reshape(5, 7)
    _, tv = CentreCrop(2)(image, label)
    _, iic = CentreCrop(2, "iic")(image, label)
    assert tv.tolist() == [[16, 17], [23, 24]]  # top round(1.5) = 2, left round(2.5) = 2
    assert iic.tolist() == [[9, 10], [16, 17]]  # top int(5/2) - 1 = 1, left int(7/2) - 1 = 2
    padded_image, padded = CentreCrop(8, "iic")(image + 1, label)
    assert padded.shape == (8, 8) and padded[0, 0] == 255 and padded_image[0, 0, 0] == 0
