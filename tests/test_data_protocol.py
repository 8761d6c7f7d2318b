"""The evaluation plans (which images train, fit the matching, are scored), the training crops,
and the description metrics.json records, on fixtures in the real layouts."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_cityscapes import make_cityscapes
from test_data_coco import cfg_for, make_coco
from test_data_potsdam import make_potsdam

from san_fast.config import Config
from san_fast.data import build_dataset, build_eval_datasets, input_channels
from san_fast.data.prepare import prepare
from san_fast.data.splits import evaluation_plan
from san_fast.data.transforms import (
    RandomCropFlip,
    RandomResizedCropFlip,
    _pil_resize,
    protocol_description,
    protocol_for,
    train_crop_step,
)

# --- plans ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,default", [
    ("synthetic", "val"), ("coco27", "val"), ("cityscapes", "val"), ("coco15", "iid"),
    ("coco3", "iid"), ("potsdam", "iid"), ("potsdam3", "iid")])
def test_default_plans(dataset, default):
    assert evaluation_plan(Config(dataset=dataset, data_root="x")).name == default


def test_plan_parts_follow_iic_and_picie():
    def parts(dataset, split):
        plan = evaluation_plan(Config(dataset=dataset, data_root="x", eval_split=split))
        return plan.train, plan.fit, plan.score, plan.held_out

    # IIC, code/utils/segmentation/data.py: IID trains, fits and scores on train + test ...
    assert parts("coco3", "iid") == (("train", "val"), ("train", "val"), ("train", "val"), False)
    # ... IID+ trains and fits on train, scores test
    assert parts("potsdam", "iid+") == (("train",), ("train",), ("val",), True)
    # PiCIE's Cityscapes evaluation: val + train, one matching on the union
    assert parts("cityscapes", "train+val") == (("train",), ("val", "train"), ("val", "train"), False)
    assert parts("coco27", "val") == (("train",), ("val",), ("val",), False)
    assert "STEGO" in evaluation_plan(Config(dataset="cityscapes", data_root="x")).follows


@pytest.mark.parametrize("dataset,split", [
    ("coco27", "iid"), ("cityscapes", "iid+"), ("synthetic", "iid"), ("coco3", "train+val")])
def test_plans_outside_their_peers_datasets_are_errors(dataset, split):
    with pytest.raises(ValueError, match=f"--eval-split {re.escape(split)} is defined for"):
        evaluation_plan(Config(dataset=dataset, data_root="x", eval_split=split))


def test_coco_iid_trains_on_both_splits_and_scores_them_at_the_evaluation_crop(tmp_path):
    make_coco(tmp_path, size=(400, 420))
    cfg = cfg_for(tmp_path, "coco3", "iic")
    train = build_dataset(cfg, "train")
    assert len(train) == 5 and train[4][0].shape == (3, 32, 32)
    plan, fit, score = build_eval_datasets(cfg)
    assert plan.name == "iid" and fit is score and len(fit) == 5
    assert all(fit[i][0].shape == (3, 128, 128) for i in (0, 4))
    cfg.eval_split = "iid+"
    plan, fit, score = build_eval_datasets(cfg)
    assert (len(build_dataset(cfg, "train")), len(fit), len(score)) == (3, 3, 2)


def test_evaluating_train_images_from_the_cache_equals_the_originals(tmp_path):
    make_coco(tmp_path, size=(400, 420))
    prepare("coco15", str(tmp_path), workers=1, progress=False, echo=lambda line: None)
    cached = cfg_for(tmp_path, "coco15", "iic", eval_split="iid+")
    direct = cfg_for(tmp_path, "coco15", "iic", eval_split="iid+", data_cache=str(tmp_path / "none"))
    (_, a, _), (_, b, _) = build_eval_datasets(cached), build_eval_datasets(direct)
    assert "san_fast_cache" in a.source and "san_fast_cache" not in b.source
    for i in range(len(a)):
        (image_a, label_a), (image_b, label_b) = a[i], b[i]
        assert torch.equal(label_a, label_b)  # the same crop ...
        assert (image_a.float() - image_b.float()).abs().mean() < 4  # ... of the JPEG q95 cache


def test_cityscapes_picie_split(tmp_path):
    make_cityscapes(tmp_path)
    cfg = Config(dataset="cityscapes", data_root=str(tmp_path), crop_size=32, eval_split="train+val")
    plan, fit, score = build_eval_datasets(cfg)
    assert fit is score and len(fit) == 2 + 3
    assert fit[4][0].shape == (3, 320, 320)  # a train image at the evaluation crop
    assert len(build_dataset(cfg, "train")) == 3


def test_input_channels():
    assert input_channels(Config(dataset="potsdam", data_root="x")) == 4
    assert input_channels(Config(dataset="potsdam3", data_root="x", potsdam_bands="rgb")) == 3
    assert input_channels(Config(dataset="coco27", data_root="x")) == 3


# --- training crops ------------------------------------------------------------------------------


def test_paper_crop_is_a_window_at_full_scale_padded_with_ignored_labels():
    image = np.arange(10 * 12 * 4, dtype=np.uint8).reshape(10, 12, 4)
    label = np.arange(120, dtype=np.uint8).reshape(10, 12)
    step = RandomCropFlip(6)
    out_image, out_label = step(image, label, torch.Generator().manual_seed(0))
    t, l = divmod(int(out_label[0, 0]), 12)
    assert np.array_equal(out_label, label[t:t + 6, l:l + 6])
    assert np.array_equal(out_image, image[t:t + 6, l:l + 6])
    draws = {step.sample(10, 12, torch.Generator().manual_seed(s))[:2] for s in range(30)}
    assert len(draws) > 10 and all(0 <= t <= 4 and 0 <= l <= 6 for t, l in draws)
    padded_image, padded = RandomCropFlip(16)(image, label, torch.Generator().manual_seed(0))
    assert padded.shape == (16, 16) and padded_image.shape == (16, 16, 4)
    assert (padded == 255).sum() == 16 * 16 - 120 and (padded_image[padded == 255] == 0).all()


def test_paper_crop_flips_only_when_asked():
    label = np.tile(np.arange(8, dtype=np.uint8), (8, 1))
    image = np.repeat(label[:, :, None], 3, axis=2)
    never = [RandomCropFlip(8)(image, label, torch.Generator().manual_seed(s))[1][0, 0] for s in range(20)]
    assert set(never) == {0}
    sometimes = [RandomCropFlip(8, 0.5)(image, label, torch.Generator().manual_seed(s))[1][0, 0]
                 for s in range(20)]
    assert set(sometimes) == {0, 7}


def test_train_crop_step_per_dataset():
    assert train_crop_step(Config(dataset="coco27", data_root="x", crop_size=64)) == RandomCropFlip(64, 0.0)
    assert train_crop_step(Config(dataset="potsdam", data_root="x")) == RandomCropFlip(128, 0.5)
    resized = train_crop_step(Config(train_crop="resized", crop_size=64, train_crop_scale=(0.3, 0.9)))
    assert resized == RandomResizedCropFlip(64, scale=(0.3, 0.9))


def test_protocol_steps_from_cache_and_originals_agree():
    crop = RandomCropFlip(32)
    for proto in (protocol_for("coco27", "picie"), protocol_for("coco3", "iic")):
        for split in ("train", "val"):
            assert proto.cache_steps(split) + proto.evaluation_steps(split, True) == \
                proto.evaluation_steps(split, False)
        assert proto.cache_steps("train") + proto.training_steps(crop, True) == \
            proto.training_steps(crop, False)


def test_four_band_resize_keeps_ir_out_of_the_colours():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    ir = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    ir[:, :15] = 0  # as RGBA, PIL would premultiply: black colours where "alpha" is 0
    label = np.zeros((20, 30), np.uint8)
    out, _ = _pil_resize(np.dstack([rgb, ir]), label, (45, 33))
    want_rgb, _ = _pil_resize(rgb, label, (45, 33))
    want_ir = np.asarray(Image.fromarray(ir).resize((45, 33), Image.BILINEAR))
    assert out.shape == (33, 45, 4)
    assert np.array_equal(out[:, :, :3], want_rgb) and np.array_equal(out[:, :, 3], want_ir)


# --- what metrics.json records -------------------------------------------------------------------


def test_description_records_protocol_crop_bands_split_overcluster_and_model():
    coco27 = protocol_description(Config(dataset="coco27", data_root="x", eval_protocol="picie"))
    assert coco27["protocol"] == "picie" and "PiCIE" in coco27["follows"]
    assert "49,629" in coco27["splits"]["train"] and "320x320" in coco27["eval_crop"]
    assert coco27["train_crop"] == "paper" and "no resampling" in coco27["train_transform"]
    assert coco27["evaluation"]["eval_split"] == "val" and coco27["channels"] == 3
    assert coco27["overcluster"]["mode"] == "hungarian-majority"
    assert coco27["model"]["generator"] == "vit" and coco27["model"]["vit_norm"] == "post"

    potsdam = protocol_description(Config(dataset="potsdam", data_root="x", eval_protocol="iic",
                                          crop_size=64, overcluster="strict", generator="unet"))
    assert "labelled_test" in potsdam["splits"]["val"] and "IR" in potsdam["input"]
    assert potsdam["channels"] == 4 and "200x200" in potsdam["eval_crop"]
    assert "64x64" in potsdam["train_transform"] and "flip p=0.5" in potsdam["train_transform"]
    assert potsdam["evaluation"]["eval_split"] == "iid"
    assert "labelled_test" in potsdam["evaluation"]["trained_on"]
    assert "STEGO" in potsdam["overcluster"]["rule"]
    assert potsdam["model"]["generator"] == "unet" and "vit_norm" not in potsdam["model"]
    rgb = protocol_description(Config(dataset="potsdam", data_root="x", potsdam_bands="rgb"))
    assert rgb["channels"] == 3 and "IR dropped" in rgb["input"]

    synthetic = protocol_description(Config(dataset="synthetic", train_crop="resized", vit_norm="post"))
    assert synthetic["protocol"] is None and "random resized crop" in synthetic["train_transform"]
    assert "Vaswani" in synthetic["model"]["vit_norm_words"]
    json.dumps([coco27, potsdam, rgb, synthetic])


def test_potsdam_description_needs_no_files(tmp_path):
    make_potsdam(tmp_path, size=40)
    out = protocol_description(Config(dataset="potsdam3", data_root=str(tmp_path), eval_split="iid+"))
    assert out["evaluation"]["held_out_matching"] is True
