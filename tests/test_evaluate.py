"""python -m san_fast.evaluate, and what a training run scores and logs: the evaluation plan, the
over-clustering rule, TensorBoard, the run folder's figures. On the synthetic set and on
fixtures of COCO-Stuff and Potsdam in their real on-disk layout."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from san_fast.api import read_assignment
from san_fast.config import resolve
from san_fast.data import build_parts
from san_fast.data.labels import class_names
from san_fast.engine import run
from san_fast.evaluate import main
from san_fast.metrics import UnsupervisedMetrics
from san_fast.predict import main as predict_main
from san_fast.runtime import Runtime
from san_fast.trainer import Trainer
from san_fast.viz import UNMATCHED_COLOUR
from test_data_coco import make_coco
from test_data_potsdam import make_potsdam
from tiny_model import save_checkpoint, tiny_model

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

# 4 steps per epoch, a log point every 2 steps, validation after epochs 2 and 3.
FLAGS = dict(crop_size=32, embed_dim=32, vit_dim=32, vit_heads=2, vit_depth=1, batch_size=8,
             synthetic_train_size=32, synthetic_val_size=16, epochs=3, eval_every=2, log_every=2,
             num_workers=0, synthetic_classes=4, num_vis=3, logger="tensorboard")
MID_STEP = 4  # the end of epoch 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic run, and a copy of its checkpoint at the end of epoch 1."""
    base = tmp_path_factory.mktemp("trained")
    out, mid = base / "run", base / "epoch1.pt"
    save = Trainer.save

    def save_and_keep(self):
        save(self)
        if self.progress.step == MID_STEP:
            shutil.copy(self.folder.file("checkpoint.pt"), mid)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "save", save_and_keep)
        run(resolve(dict(FLAGS, out=str(out)), cuda_available=False))
    return out, mid


def metrics_of(folder):
    return json.loads((folder / "metrics.json").read_text())


def events(folder):
    acc = event_accumulator.EventAccumulator(str(folder / "tensorboard"),
                                             size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_reproduces_the_runs_final_scores_exactly(trained, tmp_path, capsys):
    run_folder, _ = trained
    out = tmp_path / "eval"
    code, printed, err = run_cli(["--checkpoint", str(run_folder / "checkpoint.pt"), "--out", str(out),
                                  "--device", "cpu"], capsys)
    assert code == 0, err
    got, want = metrics_of(out), metrics_of(run_folder)
    assert got["san"] == want["san"]  # acc, mIoU, per-class IoU, assignment, confusion
    assert got["class_names"] == want["class_names"] and got["protocol"] == want["protocol"]
    assert got["trained"]["steps"] == want["train"]["steps"] == 12
    for name, iou in zip(got["class_names"], got["san"]["iou"]):
        assert f"{name}" in printed and f"{iou:.4f}" in printed
    assert f"{got['san']['miou']:.4f}" in printed
    for name in ("predictions.png", "confusion.png"):
        with Image.open(out / name) as image:
            assert image.mode == "RGB" and min(image.size) > 200
    # predict names clusters with what evaluate wrote
    assert read_assignment(out / "metrics.json", 4) == (got["san"]["assignment"], got["class_names"])


def test_the_run_folder_holds_tensorboard_logs_figures_and_the_epoch_axis(trained):
    run_folder, _ = trained
    metrics = metrics_of(run_folder)
    history = metrics["history"]
    assert history["val_epoch"] == [2, 3] and len(history["val_acc"]) == 2 and len(history["loss"]) == 3
    for name in ("confusion.png", "curves.png", "predictions.png"):
        assert (run_folder / name).stat().st_size > 0
    log = events(run_folder)
    loss = log.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6, 8, 10, 12]
    # each point is the mean over the steps since the previous one: two of them make epoch 1
    assert (loss[0].value + loss[1].value) / 2 == pytest.approx(history["loss"][0], rel=1e-5)
    assert [e.value for e in log.Scalars("train/lr")] == pytest.approx([1e-3] * 6)
    assert all(e.value > 0 for e in log.Scalars("train/images_per_second"))
    assert [e.value for e in log.Scalars("train/clusters_used")] == history["clusters_used"]
    acc = log.Scalars("val/acc")
    assert [e.step for e in acc] == [8, 12]
    assert [e.value for e in acc] == pytest.approx(history["val_acc"], rel=1e-6)
    assert acc[-1].value == pytest.approx(metrics["san"]["acc"], rel=1e-6)
    assert [e.step for e in log.Images("val/predictions")] == [8, 12]


def test_resume_hides_the_events_logged_after_its_checkpoint(trained, tmp_path):
    run_folder, mid = trained
    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    resumed = run(resolve(dict(FLAGS, out=str(copy), resume=str(mid)), cuda_available=False))
    assert resumed["san"] == metrics_of(run_folder)["san"]  # exact resume
    # the first run's events from step 5 on are purged; the resumed run logged them again
    assert [e.step for e in events(copy).Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert [e.step for e in events(copy).Scalars("val/acc")] == [8, 12]


def test_bad_inputs_are_one_line_errors_with_exit_code_2(trained, tmp_path, capsys):
    run_folder, _ = trained
    checkpoint = str(run_folder / "checkpoint.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")
    out = str(tmp_path / "out")
    cases = [
        (["--checkpoint", str(tmp_path / "none.pt"), "--out", out], "no such checkpoint"),
        (["--checkpoint", str(tmp_path / "garbage.pt"), "--out", out], "garbage.pt"),
        (["--checkpoint", checkpoint, "--out", out, "--dataset", "coco27", "--data-root", str(tmp_path)],
         "27 classes but the model has 4 clusters"),
        (["--checkpoint", checkpoint, "--out", out, "--dataset", "potsdam3", "--data-root", str(tmp_path)],
         "4-channel images but the model takes 3"),
        (["--checkpoint", checkpoint, "--out", out, "--eval-split", "iid"], "not synthetic"),
        (["--checkpoint", checkpoint, "--out", out, "--batch-size", "0"], "--batch-size 0"),
        (["--checkpoint", checkpoint, "--out", str(run_folder)], "holds a training run"),
        (["--checkpoint", checkpoint, "--out", str(tmp_path / "done")], "--overwrite"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(argv + ["--device", "cpu"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", checkpoint, "--out", out, "--overcluster", "most"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "--overcluster" in err


def cpu_runtime():
    return Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, scaler=None)


def accumulate(model, dataset, metrics, batch_size):
    """The hand-written evaluation the command must agree with: predict, count, per batch."""
    runtime = cpu_runtime()
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        metrics.update(model.predict(runtime.prepare(images)), labels)
    return metrics


def test_evaluate_and_predict_on_a_coco27_fixture(tmp_path, capsys):
    make_coco(tmp_path / "data")
    model = tiny_model(dataset="coco27", data_root=str(tmp_path / "data"))
    checkpoint = save_checkpoint(tmp_path / "model.pt", model)
    out = tmp_path / "eval"
    code, printed, err = run_cli(["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                                  "--num-workers", "0"], capsys)
    assert code == 0, err
    got = metrics_of(out)
    val = build_parts(model.cfg, ("val",), training=False)
    expected = accumulate(model, val, UnsupervisedMetrics(27, 27), model.cfg.batch_size).compute()
    assert got["san"] == expected
    assert got["san"]["num_pixels"] == sum(int((label != 255).sum()) for _, label in val) > 0
    assert got["class_names"] == list(class_names("coco27")) and "electronic" in printed
    assert got["protocol"]["protocol"] == "picie" and got["protocol"]["evaluation"]["eval_split"] == "val"

    # predict on the fixture's photos, naming clusters with the evaluation's matching
    photos = tmp_path / "data" / "cocostuff" / "images" / "val2017"
    preds = tmp_path / "preds"
    assert predict_main(["--checkpoint", str(checkpoint), str(photos), "--out", str(preds),
                         "--assignment", str(out / "metrics.json"), "--device", "cpu"]) == 0
    report = json.loads((preds / "predictions.json").read_text())
    assert len(report["images"]) == 2 and report["class_names"] == got["class_names"]
    for record in report["images"]:
        with Image.open(record["mask"]) as mask:
            assert mask.size == (64, 48) and np.asarray(mask).max() < 27


def test_held_out_strict_evaluation_of_a_four_band_potsdam_model(tmp_path, capsys):
    make_potsdam(tmp_path / "data")
    model = tiny_model(dataset="potsdam", data_root=str(tmp_path / "data"), num_semantics=8)
    checkpoint = save_checkpoint(tmp_path / "model.pt", model)
    out = tmp_path / "eval"
    code, _, err = run_cli(["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                            "--num-workers", "0", "--eval-split", "iid+", "--overcluster", "strict"], capsys)
    assert code == 0, err
    got = metrics_of(out)
    # IIC's IID+: the matching is fitted on labelled_train and scores labelled_test
    test_tiles = build_parts(model.cfg, ("val",), training=False)
    fit = accumulate(model, build_parts(model.cfg, ("train",), training=False),
                     UnsupervisedMetrics(8, 6, overcluster="strict"), 16)
    scored = accumulate(model, test_tiles, UnsupervisedMetrics(8, 6, overcluster="strict"), 16)
    assert got["san"] == scored.compute(assignment=fit.fit_assignment())
    assert got["san"]["num_pixels"] + got["san"]["left_out"] == sum(label.numel() for _, label in test_tiles)
    assert got["evaluation"]["images_fitted"] == 2 and got["evaluation"]["images_scored"] == 2
    evaluation = got["protocol"]["evaluation"]
    assert evaluation["eval_split"] == "iid+" and evaluation["held_out_matching"]
    assert got["protocol"]["overcluster"]["mode"] == "strict" and got["protocol"]["channels"] == 4
    assignment = got["san"]["assignment"]
    assert assignment.count(-1) >= 2  # 8 clusters, 6 classes: some are matched to no class

    # predict colours clusters matched to no class white, and names them
    rgbir = np.random.default_rng(0).integers(0, 256, (40, 40, 4), dtype=np.uint8)
    Image.fromarray(rgbir).save(tmp_path / "tile.png")
    preds = tmp_path / "preds"
    assert predict_main(["--checkpoint", str(checkpoint), str(tmp_path / "tile.png"), "--out", str(preds),
                         "--assignment", str(out / "metrics.json"), "--device", "cpu"]) == 0
    with Image.open(preds / "tile_mask.png") as mask:
        palette = np.array(mask.getpalette()[:3 * 8]).reshape(8, 3)
    unmatched = [k for k, a in enumerate(assignment) if a == -1]
    assert (palette[unmatched] == UNMATCHED_COLOUR).all()


def test_training_scores_the_plan_and_evaluate_reproduces_it(tmp_path, capsys):
    """Potsdam RGB + IR, IIC's IID+ and STEGO's strict over-clustering: the run's final scores
    and its k-means baseline follow the plan, and evaluate gets the same scores."""
    make_potsdam(tmp_path / "data")
    flags = dict(dataset="potsdam", data_root=str(tmp_path / "data"), crop_size=32, embed_dim=32, vit_dim=32,
                 vit_heads=2, vit_depth=1, batch_size=2, epochs=1, num_workers=0, num_semantics=8,
                 eval_split="iid+", overcluster="strict", num_vis=2, logger="none", out=str(tmp_path / "run"))
    result = run(resolve(flags, cuda_available=False))
    printed = capsys.readouterr().out
    assert "final scores: iid+ (2 images fit the matching, 2 scored)" in printed
    for method in ("san", "baseline"):
        scores = result[method]
        assert scores["overcluster"] == "strict" and len(scores["assignment"]) == 8
        assert scores["num_pixels"] + scores["left_out"] == 2 * 200 * 200  # labelled_test scored
    assert result["protocol"]["evaluation"]["eval_split"] == "iid+"
    assert not (tmp_path / "run" / "tensorboard").exists()
    code, _, err = run_cli(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out",
                            str(tmp_path / "eval"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "eval")["san"] == result["san"]
