"""`python -m san_fast.data.prepare`: layout checks, IIC's curation rule, the cache and its use by
the loaders. Fixture writers come from the loader tests (tests/ is on sys.path under pytest)."""

import json
import os

import numpy as np
import pytest
import torch
from test_data_cityscapes import make_cityscapes
from test_data_coco import GRASS, PERSON, SKY_OTHER, cfg_for, make_coco, save
from test_data_potsdam import make_potsdam

from san_fast.config import Config
from san_fast.data import build_dataset, coco
from san_fast.data._io import DatasetLayoutError
from san_fast.data.jobs import CurateJob, run_job
from san_fast.data.prepare import main, prepare

WALL_OTHER = 172  # coarse "wall": stuff, but not one of coco3's classes


def mixed(h, w, stuff, fraction, rest=PERSON):
    """The first `fraction` of the pixels (row-major) `stuff`, the others `rest`."""
    label = np.full(h * w, rest, np.uint8)
    label[: int(round(h * w * fraction))] = stuff
    return label.reshape(h, w)


# id -> (height, width, label maker); which list keeps it, by IIC's rule
CURATION = {
    "000000000001": (360, 380, lambda h, w: mixed(h, w, SKY_OTHER, 1.0)),     # 27 + 3
    "000000000002": (360, 380, lambda h, w: mixed(h, w, WALL_OTHER, 0.76)),   # 27 only
    "000000000003": (360, 380, lambda h, w: mixed(h, w, SKY_OTHER, 0.74)),    # neither: 74%
    "000000000004": (359, 400, lambda h, w: mixed(h, w, GRASS, 1.0)),         # neither: side 359
    "000000000005": (360, 380, lambda h, w: mixed(h, w, GRASS, 0.75)),        # 27 + 3: exactly 75%
    "000000000006": (360, 380, lambda h, w: np.full((h, w), 255, np.uint8)),  # neither: unlabeled
    "000000000007": (380, 360, lambda h, w: mixed(h, w, GRASS, 0.8, rest=255)),  # 27 + 3, portrait
}
KEEP = {coco.LIST_27: ["000000000001", "000000000002", "000000000005", "000000000007"],
        coco.LIST_3: ["000000000001", "000000000005", "000000000007"]}


def make_uncurated_coco(root, images=None):
    base = os.path.join(root, "cocostuff")
    rng = np.random.default_rng(3)
    for split_dir in ("train2017", "val2017"):
        for i, (h, w, make_label) in (images or CURATION).items():
            save(os.path.join(base, "images", split_dir, i + ".jpg"),
                 rng.integers(0, 256, (h, w, 3), dtype=np.uint8), quality=90)
            save(os.path.join(base, "annotations", split_dir, i + ".png"), make_label(h, w))
    return base


def quiet(**kw):
    return dict(workers=1, progress=False, echo=lambda line: None, **kw)


def cache_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("dataset", ["coco27", "coco3"])
def test_curated_lists_follow_iic_rule(tmp_path, dataset):
    make_uncurated_coco(tmp_path)
    report = prepare(dataset, str(tmp_path), **quiet(write_cache=False))
    list_name = coco.CURATED_LISTS[dataset]
    for split_dir in ("train2017", "val2017"):
        built = tmp_path / "san_fast_cache" / "cocostuff" / "curated" / split_dir / list_name
        assert built.read_text().split() == KEEP[list_name]
        assert report.counts[f"{split_dir}/{list_name}"] == len(KEEP[list_name])
        assert report.counts[f"{split_dir}/images"] == len(CURATION)
    # the loaders find the built lists
    assert len(build_dataset(cfg_for(tmp_path, dataset), "val")) == len(KEEP[list_name])


def test_published_lists_are_used_as_they_are(tmp_path):
    base = make_uncurated_coco(tmp_path)
    for split_dir in ("train2017", "val2017"):
        path = os.path.join(base, "curated", split_dir, coco.LIST_27)
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write("000000000003\n")  # not what IIC's rule would keep: proves it is not rebuilt
    lines = []
    report = prepare("coco15", str(tmp_path), workers=1, progress=False, echo=lines.append,
                     write_cache=False)
    assert report.counts["train2017/" + coco.LIST_27] == 1
    assert any("(published copy)" in line for line in lines)
    assert not (tmp_path / "san_fast_cache" / "cocostuff" / "curated").exists()


def test_coco_cache_is_written_atomically_and_used(tmp_path):
    make_coco(tmp_path)
    report = prepare("coco27", str(tmp_path), **quiet(protocol="all"))
    assert not report.errors
    cache = tmp_path / "san_fast_cache"
    files = cache_files(cache)
    assert not [f for f in files if f.endswith(".tmp")]
    for protocol in ("picie", "iic"):
        assert f"cocostuff/{protocol}/train2017/images/000000000009.jpg" in files
        assert f"cocostuff/{protocol}/val2017/images/000000000139.png" in files
        assert f"cocostuff/{protocol}/val2017/labels/000000000139.png" in files
        manifest = json.loads((cache / "cocostuff" / protocol / "val2017" /
                               f"manifest-{coco.LIST_27}.json").read_text())
        assert manifest["count"] == 2 and manifest["protocol"].startswith(protocol)
    val = build_dataset(cfg_for(tmp_path), "val")
    assert val.source == str(cache / "cocostuff" / "picie" / "val2017")


@pytest.mark.parametrize("dataset,protocol", [("coco27", "picie"), ("coco15", "iic"), ("coco3", "picie")])
def test_cached_items_equal_uncached_items(tmp_path, dataset, protocol):
    make_coco(tmp_path, size=(400, 420))
    prepare(dataset, str(tmp_path), **quiet(protocol=protocol))
    cached = cfg_for(tmp_path, dataset, protocol)
    direct = cfg_for(tmp_path, dataset, protocol, data_cache=str(tmp_path / "no-cache"))
    for split in ("train", "val"):
        a, b = build_dataset(cached, split), build_dataset(direct, split)
        assert a.source != b.source
        for i in range(len(a)):
            torch.manual_seed(i)
            image_a, label_a = a[i]
            torch.manual_seed(i)
            image_b, label_b = b[i]
            assert torch.equal(label_a, label_b)
            if split == "val":  # lossless PNG: the very same pixels
                assert torch.equal(image_a, image_b)
            else:  # JPEG q95 of the resized image
                assert (image_a.float() - image_b.float()).abs().mean() < 4


def test_cache_resumes_and_reports_up_to_date(tmp_path):
    make_coco(tmp_path)
    prepare("coco27", str(tmp_path), **quiet())
    folder = tmp_path / "san_fast_cache" / "cocostuff" / "picie" / "train2017"
    lines = []
    prepare("coco27", str(tmp_path), workers=1, progress=False, echo=lines.append)
    assert any("up to date" in line for line in lines)
    (folder / f"manifest-{coco.LIST_27}.json").unlink()
    (folder / "images" / "000000000025.jpg").unlink()
    lines.clear()
    prepare("coco27", str(tmp_path), workers=1, progress=False, echo=lines.append)
    assert any("3 items (1 written, 2 kept)" in line for line in lines)


def test_cache_in_out_folder_used_through_cfg_data_cache(tmp_path):
    make_coco(tmp_path / "data")
    out = tmp_path / "fast"
    prepare("coco27", str(tmp_path / "data"), **quiet(out=str(out)))
    cfg = cfg_for(tmp_path / "data", data_cache=str(out))
    assert build_dataset(cfg, "train").source == str(out / "cocostuff" / "picie" / "train2017")
    assert not (tmp_path / "data" / "san_fast_cache").exists()


def test_corrupt_file_is_reported_and_blocks_the_manifest(tmp_path, capsys):
    base = make_coco(tmp_path)
    with open(os.path.join(base, "images", "val2017", "000000000285.jpg"), "wb") as f:
        f.write(b"\xff\xd8 truncated")
    assert main(["coco27", "--data-root", str(tmp_path), "--workers", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 files could not be used" in err and "000000000285.jpg" in err
    val_cache = tmp_path / "san_fast_cache" / "cocostuff" / "picie" / "val2017"
    assert not (val_cache / f"manifest-{coco.LIST_27}.json").exists()
    assert (tmp_path / "san_fast_cache" / "cocostuff" / "picie" / "train2017" /
            f"manifest-{coco.LIST_27}.json").exists()


def test_cli_reports_counts(tmp_path, capsys):
    make_coco(tmp_path)
    assert main(["coco27", "--data-root", str(tmp_path), "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train2017: 3 images, 3 annotation PNGs" in out
    assert f"val2017: 2 curated images in {coco.LIST_27} (published: 2,175)" in out
    assert out.rstrip().endswith("done")


def test_cli_missing_layout(tmp_path, capsys):
    assert main(["cityscapes", "--data-root", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Cityscapes not found at" in err and "expected layout:" in err


@pytest.mark.parametrize("flags, message", [
    (["nothing"], "argument name: invalid choice: 'nothing'"),
    (["coco27", "--workers", "-1"], "--workers -1: expected an integer >= 0"),
    (["coco27", "--out", "{dir}/file.txt"], "is an existing file: expected a folder"),
    (["coco27", "--out", "/proc/san_fast_no_such_folder/cache"], "/proc/san_fast_no_such_folder"),
])
def test_cli_bad_arguments_are_one_line(tmp_path, capsys, flags, message):
    make_coco(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    argv = ["--data-root", str(tmp_path), "--workers", "1", "--quiet"] + [f.format(dir=tmp_path) for f in flags]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("python -m san_fast.data.prepare: error: ") and message in err, err


def test_cli_missing_folder_inside_coco(tmp_path, capsys):
    base = make_coco(tmp_path)
    os.rename(os.path.join(base, "annotations", "val2017"), os.path.join(base, "annotations", "x"))
    assert main(["coco27", "--data-root", str(tmp_path), "--workers", "1", "--quiet"]) == 2
    assert "annotations/val2017; expected layout" in capsys.readouterr().err


def test_cityscapes_cache(tmp_path):
    make_cityscapes(tmp_path, size=(64, 128))
    report = prepare("cityscapes", str(tmp_path), **quiet(protocol="all"))
    assert report.counts == {"train": 3, "val": 2}
    assert not (tmp_path / "san_fast_cache" / "cityscapes" / "iic").exists()
    cached = Config(dataset="cityscapes", data_root=str(tmp_path), crop_size=32)
    direct = Config(dataset="cityscapes", data_root=str(tmp_path), crop_size=32)
    direct.data_cache = str(tmp_path / "none")
    a, b = build_dataset(cached, "val"), build_dataset(direct, "val")
    assert "san_fast_cache" in a.source
    assert torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])
    assert set(a[0][1].unique().tolist()) == {0, 26, 255}


def test_potsdam_is_checked_not_cached(tmp_path, capsys):
    base = make_potsdam(tmp_path, size=40)
    report = prepare("potsdam3", str(tmp_path), **quiet())
    assert report.counts == {"labelled_train.txt": 2, "labelled_test.txt": 2, "unlabelled_train.txt": 1}
    assert report.cache is None and not report.errors
    # no image cache: only the record of the tiles checked, which training then skips
    assert os.listdir(tmp_path / "san_fast_cache") == ["verified.json"]
    with open(os.path.join(base, "gt", "11.mat"), "wb") as f:
        f.write(b"broken")
    assert main(["potsdam", "--data-root", str(tmp_path), "--workers", "1", "--quiet"]) == 1
    assert "11.mat" in capsys.readouterr().err


def test_potsdam_missing_list(tmp_path):
    base = make_potsdam(tmp_path, size=40)
    os.remove(os.path.join(base, "labelled_test.txt"))
    with pytest.raises(DatasetLayoutError, match="labelled_test.txt not found"):
        prepare("potsdam", str(tmp_path), **quiet())


def test_worker_processes_give_the_same_results(tmp_path):
    paths = []
    for k in range(70):
        path = str(tmp_path / f"{k}.png")
        save(path, mixed(360, 360, SKY_OTHER, 0.5 + k / 200))
        paths.append(path)
    job = CurateJob(paths, coco.curation_lut(coco.LIST_27))
    serial = run_job(job, workers=1, desc="", progress=False)
    parallel = run_job(job, workers=2, desc="", progress=False)
    assert serial == parallel
    assert [keep for _, keep in serial] == [0.5 + k / 200 >= 0.75 for k in range(70)]


# --- lists and labels are checked before anything is built from them ---------------------------

def write_list(base, split_dir, lines):
    path = os.path.join(base, "curated", split_dir, coco.LIST_27)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("lines,message", [
    ([], "is empty: expected one image id per line"),
    (["000000000009", "000000000025", "000000000009"], "'000000000009' is listed twice (lines 1 and 3)"),
    (["../../etc/passwd"], "line 1: id '../../etc/passwd' holds a path separator or '..'"),
    (["images/000000000009"], "holds a path separator"),
])
def test_bad_curated_lists_are_refused(tmp_path, capsys, lines, message):
    base = make_coco(tmp_path)
    write_list(base, "train2017", lines)
    assert main(["coco27", "--data-root", str(tmp_path), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m san_fast.data.prepare: error: ") and message in err and len(err.splitlines()) == 1


def test_labels_in_another_format_are_refused_before_a_list_is_built(tmp_path, capsys):
    """COCO-Stuff's stuff-only maps (values 1-183, 0 unlabeled) are not the fine ids 0-181: IIC's
    rule would still keep some images, and write a wrong list."""
    stuff_only = {i: (h, w, lambda h, w: mixed(h, w, 183, 0.8, rest=92)) for i, (h, w, _) in CURATION.items()}
    make_uncurated_coco(tmp_path, stuff_only)
    assert main(["coco27", "--data-root", str(tmp_path), "--workers", "1", "--quiet", "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert "values 183 out of range (expected COCO-Stuff fine ids 0-181, or 255" in err
    assert not (tmp_path / "san_fast_cache" / "cocostuff" / "curated").exists()


def test_a_curation_that_keeps_nothing_writes_no_list(tmp_path, capsys):
    small = {i: (100, 100, lambda h, w: mixed(h, w, SKY_OTHER, 1.0)) for i in CURATION}
    make_uncurated_coco(tmp_path, small)
    assert main(["coco27", "--data-root", str(tmp_path), "--workers", "1", "--quiet", "--no-cache"]) == 1
    assert "none of the 7 annotations meets IIC's rule" in capsys.readouterr().err
    assert not (tmp_path / "san_fast_cache" / "cocostuff" / "curated").exists()


def test_prepare_records_what_it_checked_for_training(tmp_path):
    from san_fast.data.verify import verify_dataset

    make_coco(tmp_path)
    prepare("coco27", str(tmp_path), **quiet())
    cfg = cfg_for(tmp_path)
    record = str(tmp_path / "san_fast_cache")
    for split in ("train", "val"):  # cached copies, written and vouched for by prepare
        assert verify_dataset(build_dataset(cfg, split), split, record, progress=False) == 0
    direct = cfg_for(tmp_path, data_cache=str(tmp_path / "san_fast_cache"))
    direct.data_cache = str(tmp_path / "elsewhere")  # the originals, vouched for by prepare too
    assert verify_dataset(build_dataset(direct, "train"), "train", record, progress=False) == 0
