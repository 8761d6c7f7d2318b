"""Every bad invocation of train.py: exit code 2, one line on stderr, nothing written, no traceback.

Run in-process (train.main) to keep them fast; each case gets a fresh folder whose files are
compared before and after.
"""

import pickle

import pytest
import torch

import train
from san_fast.config import resolve

TINY = ["--crop-size", "32", "--embed-dim", "32", "--vit-dim", "32", "--vit-heads", "2", "--vit-depth", "1",
        "--batch-size", "8", "--synthetic-train-size", "16", "--synthetic-val-size", "8", "--epochs", "1",
        "--no-baseline"]


def _checkpoint(path, **config):
    """A checkpoint of another model: only its config matters (it is refused before loading)."""
    flags = dict(crop_size=32, embed_dim=32, vit_dim=32, vit_heads=2, vit_depth=1, batch_size=8,
                 synthetic_train_size=16, synthetic_val_size=8, epochs=1, baseline=False)
    cfg = resolve(dict(flags, **config), cuda_available=False)
    torch.save({"model": {}, "config": cfg.to_dict()}, path)


class RunsCode:
    def __reduce__(self):
        return (print, ("the pickle ran code",))


def _unsafe(path):
    torch.save({"model": {}, "config": {}, "payload": RunsCode()}, path)


def _unsafe_plain_pickle(path):
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "config": {}, "payload": RunsCode()}, f)


def _run_folder(path):
    path.mkdir()
    (path / "checkpoint.pt").write_bytes(b"an earlier run")


# (flags, text the message must contain, a function preparing files in the folder)
CASES = {
    "epochs 0": (["--epochs", "0"], "--epochs 0: expected an integer >= 1", None),
    "max-steps 0": (["--max-steps", "0"], "--max-steps 0", None),
    "max-steps negative": (["--max-steps", "-5"], "--max-steps -5", None),
    "batch-size 0": (["--batch-size", "0"], "--batch-size 0", None),
    "lr negative": (["--lr", "-1"], "--lr -1.0: expected a finite number > 0", None),
    "lr zero": (["--lr", "0"], "--lr 0.0", None),
    "lr nan": (["--lr", "nan"], "--lr nan", None),
    "patch-size 0": (["--patch-size", "0"], "--patch-size 0", None),
    "embed-dim 0": (["--embed-dim", "0"], "--embed-dim 0", None),
    "embed-dim below the op's tile": (["--embed-dim", "8"], "--embed-dim 8: expected at least 16", None),
    "num-workers -1": (["--num-workers", "-1"], "--num-workers -1: expected an integer >= 0", None),
    "color-drop 5": (["--color-drop", "5"], "--color-drop 5.0: expected a finite number >= 0 and <= 1", None),
    "color-jitter 1.5": (["--color-jitter", "1.5"], "--color-jitter 1.5", None),
    "num-semantics 1000": (["--num-semantics", "1000"], "--num-semantics 1000: expected 2 to 256", None),
    "num-semantics 1": (["--num-semantics", "1"], "--num-semantics 1: expected 2 to 256", None),
    "synthetic-val-size 0": (["--synthetic-val-size", "0"], "--synthetic-val-size 0", None),
    "synthetic-classes 1": (["--synthetic-classes", "1"], "--synthetic-classes 1", None),
    "vit-heads 0": (["--vit-heads", "0"], "--vit-heads 0", None),
    "vit-heads not dividing": (["--vit-heads", "5"], "divisible by --vit-heads 5", None),
    "vit-depth 0": (["--vit-depth", "0"], "--vit-depth 0", None),
    "crop not a multiple of the patch": (["--crop-size", "36"], "multiple of --patch-size", None),
    "save-every 0": (["--save-every", "0"], "--save-every 0", None),
    "log-every 0": (["--log-every", "0"], "--log-every 0", None),
    "profile-steps 0": (["--profile-steps", "0"], "--profile-steps 0", None),
    "eval-every 0": (["--eval-every", "0"], "--eval-every 0", None),
    "seed -1": (["--seed", "-1"], "--seed -1", None),
    "weight-decay negative": (["--weight-decay", "-0.1"], "--weight-decay -0.1", None),
    "uniformity-weight inf": (["--uniformity-weight", "inf"], "--uniformity-weight inf", None),
    "device unknown": (["--device", "tpu9"], "--device 'tpu9'", None),
    "device cuda without one": (["--device", "cuda"], "CUDA is not available", None),
    "not a number": (["--epochs", "two"], "argument --epochs: invalid int value: 'two'", None),
    "unknown dataset": (["--dataset", "imagenet"], "argument --dataset: invalid choice", None),
    "dataset without root": (["--dataset", "coco27"], "pass --data-root DIR", None),
    "data-root for the synthetic set": (["--data-root", "{dir}"], "--data-root given for the synthetic dataset", None),
    "synthetic flag with a real dataset": (["--dataset", "coco27", "--data-root", "{dir}"],
                                           "--synthetic-train-size, --synthetic-val-size only apply to --dataset "
                                           "synthetic, not coco27", None),
    "potsdam bands for coco": (["--potsdam-bands", "rgb"], "--potsdam-bands only applies", None),
    "out is a file": (["--out", "{dir}/file.txt"], "is an existing file", lambda d: (d / "file.txt").write_text("x")),
    "out holds a run": (["--out", "{dir}/old"], "already holds a run", lambda d: _run_folder(d / "old")),
    "resume into another run's folder": (["--resume", "{dir}/c.pt", "--out", "{dir}/old"], "holds another run than --resume",
                                         lambda d: (_checkpoint(d / "c.pt"), _run_folder(d / "old"))),
    "resume missing": (["--resume", "{dir}/none.pt"], "--resume {dir}/none.pt: no such file", None),
    "resume empty": (["--resume", "{dir}/empty.pt"], "is empty (0 bytes)", lambda d: (d / "empty.pt").touch()),
    "resume and overwrite": (["--resume", "{dir}/c.pt", "--overwrite"], "contradict",
                             lambda d: _checkpoint(d / "c.pt")),
    "resume another model": (["--resume", "{dir}/c.pt"], "embed_dim 64 (this run: 32)",
                             lambda d: _checkpoint(d / "c.pt", embed_dim=64)),
    "resume another dataset size": (["--resume", "{dir}/c.pt"], "synthetic_classes 5 (this run: 6)",
                                    lambda d: _checkpoint(d / "c.pt", synthetic_classes=5)),
    "resume unsafe checkpoint": (["--resume", "{dir}/evil.pt"], "refused to load {dir}/evil.pt: it holds Python "
                                 "objects other than tensors and plain types, whose unpickling could run code "
                                 "(Unsupported global: GLOBAL print)", lambda d: _unsafe(d / "evil.pt")),
    "resume unsafe pickle": (["--resume", "{dir}/evil.pkl"], "refused to load",
                             lambda d: _unsafe_plain_pickle(d / "evil.pkl")),
    "resume not a checkpoint": (["--resume", "{dir}/text.pt"], "is not a readable checkpoint",
                                lambda d: (d / "text.pt").write_text("hello")),
    "batch larger than the data": (["--synthetic-train-size", "4"], "fewer than one global batch", None),
    "out cannot be created": (["--out", "/proc/san_fast_no_such_folder/run"], "cannot create the run folder", None),
}


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


@pytest.mark.filterwarnings("error")  # a warning would be one more line on stderr
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_invocation_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    flags, message, prepare = CASES[case]
    if prepare is not None:
        prepare(tmp_path)
    before = _tree(tmp_path)
    argv = TINY + ["--out", str(tmp_path / "run")] + [f.format(dir=tmp_path) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    assert message.format(dir=tmp_path) in lines[0]
    assert "Traceback" not in err and "the pickle ran code" not in out + err
    assert _tree(tmp_path) == before


def test_batch_that_does_not_split_over_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: error (rank 0): --batch-size 8 is the global batch and must split evenly over 3 "
                   "processes (WORLD_SIZE=3): use a multiple of 3"]
    assert not (tmp_path / "run").exists()
