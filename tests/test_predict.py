"""python -m san_fast.predict: files and folders of every kind, masks, overlays, failures, exit codes."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from san_fast.predict import main
from san_fast.viz import label_palette
from tiny_model import save_checkpoint, smooth_image, tiny_model

N = 5  # the tiny model's clusters


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", model)


def rotated_jpeg(path: Path, pixels: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: width and height swap
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def write_inputs(root: Path) -> dict[str, np.ndarray]:
    """Image files of every kind predict must read; returns the RGB pixels expected per name."""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    (root / "other").mkdir()
    rgb = smooth_image(40, 56)
    Image.fromarray(rgb).save(photos / "a.png")
    Image.fromarray(rgb).save(root / "other" / "a.png")  # same name in another folder
    Image.fromarray(smooth_image(40, 56, seed=1)).save(photos / "b.jpg", quality=95)
    gray16 = (smooth_image(33, 47, seed=2)[..., 0].astype(np.uint16) * 257 + 100)
    Image.fromarray(gray16).save(photos / "sub" / "c.tif")
    Image.fromarray(smooth_image(20, 30, seed=3)[..., 1]).save(photos / "d_gray.png")
    rgba = np.concatenate([smooth_image(24, 24, seed=4), np.full((24, 24, 1), 9, np.uint8)], -1)
    Image.fromarray(rgba).save(photos / "e.png")
    Image.fromarray(smooth_image(24, 40, seed=5)).convert("P").save(photos / "f.png")
    rotated_jpeg(photos / "g.jpg", smooth_image(16, 40, seed=6))
    (photos / "broken.png").write_bytes(b"not a png at all")
    (photos / "readme.txt").write_text("skipped: not an image suffix")
    Image.fromarray(smooth_image(200, 300, seed=7)).save(root / "big.jpg", quality=90)
    (root / "notes.txt").write_text("named directly: an error")
    gray8 = np.round(gray16 / 257).astype(np.uint8)
    return {"a": rgb, "c": np.repeat(gray8[..., None], 3, -1)}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("predict: error:")]


def test_predict_writes_masks_and_overlays_and_reports_failures(model, checkpoint, tmp_path, capsys):
    expected = write_inputs(tmp_path)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(checkpoint), str(tmp_path / "photos"), str(tmp_path / "other"),
                 str(tmp_path / "big.jpg"), str(tmp_path / "notes.txt"), str(tmp_path / "missing.png"),
                 "--out", str(out), "--device", "cpu", "--batch-size", "3", "--max-side", "64"])
    err = capsys.readouterr().err
    assert code == 1
    errors = error_lines(err)
    assert len(errors) == 3 and "Traceback" not in err
    for name in ("broken.png", "notes.txt", "missing.png"):
        assert sum(name in line for line in errors) == 1

    sizes = {"photos/a": (56, 40), "other/a": (56, 40), "b": (56, 40), "sub/c": (47, 33),
             "d_gray": (30, 20), "e": (24, 24), "f": (40, 24), "g": (16, 40), "big": (300, 200)}
    report = json.loads((out / "predictions.json").read_text())
    assert len(report["images"]) == len(sizes) and len(report["failed"]) == 3
    masks = {}
    for record in report["images"]:
        with Image.open(record["mask"]) as mask:
            assert mask.mode == "P"
            assert np.array_equal(np.array(mask.getpalette()[:3 * N]).reshape(N, 3), label_palette(N))
            masks[record["mask"]] = np.asarray(mask)
        assert masks[record["mask"]].max() < N
        assert tuple(record["size"]) == masks[record["mask"]].shape[::-1]
        with Image.open(record["overlay"]) as overlay:
            assert overlay.mode == "RGB" and min(overlay.size) > 100
    stems = sorted(Path(m).name for m in masks)
    assert stems == sorted({"a_png_mask.png", "a_png_1_mask.png", "b_mask.png", "c_mask.png",
                            "d_gray_mask.png", "e_mask.png", "f_mask.png", "g_mask.png", "big_mask.png"})
    by_input = {Path(r["input"]).relative_to(tmp_path).with_suffix("").as_posix(): r
                for r in report["images"]}
    assert by_input["big"]["segmented_size"] == [64, 43]  # segmented at --max-side, mask at full size
    assert masks[by_input["big"]["mask"]].shape == (200, 300)
    # what the CLI writes is what the API gives for the same pixels (16-bit scaled to 8)
    assert np.array_equal(masks[by_input["photos/a"]["mask"]], model.segment(expected["a"]))
    assert np.array_equal(masks[by_input["photos/sub/c"]["mask"]], model.segment(expected["c"]))


def test_predict_names_clusters_with_an_assignment(checkpoint, tmp_path, capsys):
    Image.fromarray(smooth_image(32, 32)).save(tmp_path / "x.png")
    names = ["sky", "grass", "road"]
    metrics = {"san": {"assignment": [2, 0, 1, 1, 0]}, "class_names": names}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "out"
    code = main(["--checkpoint", str(checkpoint), str(tmp_path / "x.png"), "--out", str(out),
                 "--assignment", str(tmp_path / "metrics.json"), "--device", "cpu"])
    assert code == 0 and not error_lines(capsys.readouterr().err)
    report = json.loads((out / "predictions.json").read_text())
    assert report["class_names"] == names
    with Image.open(out / "x_mask.png") as mask:
        palette = np.array(mask.getpalette()[:3 * N]).reshape(N, 3)
    # each cluster is painted in the colour of the class it was matched to
    assert np.array_equal(palette, label_palette(3)[[2, 0, 1, 1, 0]])


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_bad_arguments_are_one_line_errors_with_code_2(checkpoint, tmp_path, capsys):
    Image.fromarray(smooth_image(16, 16)).save(tmp_path / "x.png")
    image, out = str(tmp_path / "x.png"), str(tmp_path / "out")
    code, err = run_main(["--checkpoint", str(checkpoint), "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no INPUT" in err
    code, err = run_main(["--checkpoint", str(tmp_path / "nope.pt"), image, "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope.pt" in err
    code, err = run_main([image, "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--checkpoint" in err

    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"assignment": [0, 1], "class_names": ["a", "b"]}))
    for argv, needle in [
        (["--checkpoint", str(tmp_path / "garbage.pt"), image], "garbage.pt"),
        (["--checkpoint", str(checkpoint), image, "--assignment", str(wrong)], "2 clusters"),
        (["--checkpoint", str(checkpoint), str(tmp_path / "none.png")], "no image files"),
        (["--checkpoint", str(checkpoint), image, "--out", str(tmp_path / "x.png")], "is an existing file"),
        (["--checkpoint", str(checkpoint), image, "--out", "/proc/no_such_folder/out"], "cannot be created"),
    ]:
        default_out = [] if "--out" in argv else ["--out", out]
        assert main(argv + default_out + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_module_entry_point_exit_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "san_fast.predict", "--checkpoint", "x.pt",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1


def test_four_band_model_reads_rgbir_files_and_names_rgb_ones(tmp_path, capsys):
    model = tiny_model(dataset="potsdam", data_root="unused", potsdam_bands="rgbir")
    checkpoint = save_checkpoint(tmp_path / "potsdam.pt", model)
    rgbir = np.concatenate([smooth_image(24, 24), smooth_image(24, 24, seed=1)[..., :1]], -1)
    Image.fromarray(rgbir).save(tmp_path / "tile.png")  # 4 bands, stored as RGBA
    Image.fromarray(smooth_image(24, 24)).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    code = main(["--checkpoint", str(checkpoint), str(tmp_path / "tile.png"), str(tmp_path / "photo.png"),
                 "--out", str(out), "--device", "cpu"])
    errors = error_lines(capsys.readouterr().err)
    assert code == 1 and len(errors) == 1 and "photo.png" in errors[0] and "RGB + IR" in errors[0]
    with Image.open(out / "tile_mask.png") as mask:
        assert np.array_equal(np.asarray(mask), model.segment(rgbir))
