import json
import stat

import pytest
import torch
from PIL import Image

from san_fast import io_utils
from san_fast.io_utils import (atomic_save_image, atomic_torch_save, atomic_write,
                               atomic_write_json, atomic_write_text)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_text_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "note.txt"
    assert atomic_write_text(path, "héllo\n") == path
    assert path.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(str(path), "second")
    assert path.read_text() == "second"
    assert leftovers(path.parent) == []


def test_json_round_trip_keeps_key_order(tmp_path):
    obj = {"b": 1, "a": [1.5, None, "x"], "nan": float("nan")}
    path = atomic_write_json(tmp_path / "m.json", obj)
    text = path.read_text()
    assert text.index('"b"') < text.index('"a"')
    loaded = json.loads(text)
    assert loaded["a"] == [1.5, None, "x"] and loaded["nan"] != loaded["nan"]


def test_torch_save_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "step": 7}
    path = atomic_torch_save(state, tmp_path / "ckpt" / "last.pt")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7


def test_image_round_trip_and_format_from_suffix(tmp_path):
    image = Image.new("RGB", (5, 3), (10, 200, 30))
    for name in ("x.png", "x.JPG"):
        path = atomic_save_image(tmp_path / name, image)
        with Image.open(path) as im:
            assert im.size == (5, 3)
    with pytest.raises(ValueError, match="suffix"):
        atomic_save_image(tmp_path / "x.unknown", image)
    assert not (tmp_path / "x.unknown").exists()


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write_text(path, "old contents")

    def half_then_fail(f):
        f.write(b"new but incompl")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old contents"
    assert leftovers(tmp_path) == []


def test_failed_serialisation_keeps_the_old_file(tmp_path):
    json_path = atomic_write_json(tmp_path / "m.json", {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(json_path, {"bad": torch.zeros(1)})
    with pytest.raises(ValueError):
        atomic_write_json(json_path, {"bad": float("inf")}, allow_nan=False)
    assert json.loads(json_path.read_text()) == {"ok": 1}

    pt_path = atomic_torch_save({"a": 1}, tmp_path / "c.pt")
    with pytest.raises(Exception):
        atomic_torch_save({"fn": lambda: 0}, pt_path)  # lambdas cannot be pickled
    assert torch.load(pt_path, weights_only=True) == {"a": 1}
    assert leftovers(tmp_path) == []


def test_new_files_get_the_mode_open_would_give(tmp_path):
    # mkstemp alone would leave 0o600; results should be as readable as a plain open() makes them
    path = atomic_write_text(tmp_path / "f.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~io_utils._UMASK
