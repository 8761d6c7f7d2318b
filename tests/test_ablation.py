"""The ablation runner's grids (Tables 4 and 5): which model each training gets, and the tables
it writes. Training itself is replaced by a stub that records the config it was given."""

import json

import pytest

from san_fast import ablation


@pytest.fixture
def trainings(monkeypatch):
    seen = []

    def fake_run(cfg):
        seen.append(cfg)
        acc = {"conv3x3": 0.8, "resnet18": 0.7, "unet": 0.6}[cfg.encoder] + 0.01 * len(seen)
        result = {"san": {"acc": acc, "miou": acc / 2, "clusters_used": 6}}
        if cfg.baseline:
            result["baseline"] = {"acc": 0.5, "miou": 0.25, "clusters_used": 6}
        return result

    monkeypatch.setattr(ablation, "run", fake_run)
    return seen


def test_table4_trains_each_backbone_once_and_fills_the_papers_cells(tmp_path, trainings):
    ablation.main(["--table", "4", "--out", str(tmp_path), "--epochs", "1"])
    models = [(c.encoder, c.generator, c.vit_depth if c.generator == "vit" else None) for c in trainings]
    assert models == [("conv3x3", "vit", 6), ("resnet18", "vit", 6), ("unet", "vit", 6),
                      ("conv3x3", "resnet18", None), ("conv3x3", "unet", None), ("conv3x3", "vit", 4)]
    assert all(c.epochs == 1 and not c.baseline for c in trainings)
    assert len({c.out for c in trainings}) == 6
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert table[0] == "| | ResNet18 | UNet | 3x3 Conv | ViT-4 | ViT-6 |"
    # the reference run (first, acc 81%) fills Enc./3x3 Conv and Dec./ViT-6
    assert table[2] == "| Enc. | 72.0 / 36.0 | 63.0 / 31.5 | 81.0 / 40.5 | - | - |"
    assert table[3] == "| Dec. | 84.0 / 42.0 | 85.0 / 42.5 | - | 86.0 / 43.0 | 81.0 / 40.5 |"
    assert len(json.loads((tmp_path / "ablation.json").read_text())) == 6


def test_table5_is_the_default(tmp_path, trainings):
    ablation.main(["--out", str(tmp_path)])
    assert [(c.reconstruction, c.batch_wise, c.token_matcher) for c in trainings] == [
        (False, True, True), (True, False, False), (True, False, True), (True, True, False),
        (True, True, True)]
    assert [c.baseline for c in trainings] == [False] * 4 + [True]
    table = (tmp_path / "ablation.md").read_text()
    assert "| full model | 85.0 | 42.5 | 6 |" in table
    assert "| k-means on pixels (baseline) | 50.0 | 25.0 | 6 |" in table


def test_row_folders_holding_runs_need_overwrite(tmp_path, trainings, capsys):
    row = tmp_path / "full_model"
    row.mkdir()
    (row / "checkpoint.pt").write_bytes(b"x")
    assert ablation.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "full_model" in err and "--overwrite" in err
    assert trainings == []  # refused before the first training
    assert ablation.main(["--out", str(tmp_path), "--overwrite"]) == 0
    assert len(trainings) == 5 and all(c.overwrite for c in trainings)


def test_a_bad_flag_is_one_line_before_any_training(tmp_path, trainings, capsys):
    assert ablation.main(["--out", str(tmp_path), "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--epochs 0" in err and trainings == []
