"""Training logs for TensorBoard (``torch.utils.tensorboard.SummaryWriter``), or nothing.

``resolve_logger(cfg.logger, run_folder)`` gives a logger with the same methods either way, so
the training loop calls it unconditionally. Only rank 0 of a distributed run writes: the other
ranks get the no-op logger. Event files go to ``<run folder>/tensorboard``; watch a run with
``tensorboard --logdir runs``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch

from san_fast.config import LOGGERS, ConfigError
from san_fast.run_folder import TENSORBOARD

_notice_shown = False


class NullLogger:
    """Accepts every call and writes nothing (``--logger none``, ranks other than 0)."""

    enabled = False
    log_dir: Optional[Path] = None

    def scalars(self, step: int, values: Mapping[str, Optional[float]], prefix: str = "") -> None:
        pass

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def log_train(self, step: int, terms: Mapping[str, float], lr: Optional[float] = None,
                  images_per_second: Optional[float] = None,
                  clusters_used: Optional[int] = None) -> None:
        """Loss terms (``train/loss``, ``train/rec``, ...), the learning rate, throughput and
        the collapse indicator (how many of the N semantics win at least one pixel)."""
        self.scalars(step, {**terms, "lr": lr, "images_per_second": images_per_second,
                            "clusters_used": clusters_used}, prefix="train/")

    def log_eval(self, step: int, scores: Mapping, grid: Optional[np.ndarray] = None) -> None:
        """Validation ``val/acc``, ``val/miou``, ``val/clusters_used``, and the prediction grid
        (the pixels ``viz.save_prediction_grid`` returns) as the image ``val/predictions``."""
        self.scalars(step, {k: scores.get(k) for k in ("acc", "miou", "clusters_used")},
                     prefix="val/")
        if grid is not None:
            self.image("val/predictions", grid, step)
        self.flush()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardLogger(NullLogger):
    enabled = True

    def __init__(self, log_dir: Union[str, Path], purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # purge_step: on resume, events a crashed run wrote after the checkpoint are hidden.
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, Optional[float]], prefix: str = "") -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        pixels = np.asarray(pixels)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"image {tag!r}: expected (H, W, 3) uint8 pixels, got "
                             f"{pixels.dtype} {pixels.shape}")
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_logger(kind: str) -> None:
    """Before any work: ``kind`` is known, and "tensorboard" has its package."""
    if kind not in LOGGERS:
        raise ConfigError(f"--logger {kind!r}: expected one of {', '.join(LOGGERS)}")
    if kind == "tensorboard" and not tensorboard_available():
        raise ConfigError("--logger tensorboard: the tensorboard package is not installed "
                          "(pip install 'san-fast[tensorboard]', or --logger none)")


def resolve_logger(kind: str, out_dir: Union[str, Path],
                   purge_step: Optional[int] = None) -> NullLogger:
    """``kind``: "tensorboard" (an error if the package is missing), "none", or "auto"
    (TensorBoard when it imports, else the no-op logger and one notice per process).
    ``purge_step``: the first step a resumed run logs again; events a crashed run wrote from
    that step on are hidden."""
    global _notice_shown
    check_logger(kind)
    if kind == "none" or not is_rank_zero():
        return NullLogger()
    if not tensorboard_available():
        if not _notice_shown:
            print("san_fast: tensorboard is not installed, so no TensorBoard logs are written "
                  "(pip install 'san-fast[tensorboard]'; --logger none hides this notice)",
                  file=sys.stderr)
            _notice_shown = True
        return NullLogger()
    return TensorBoardLogger(Path(out_dir) / TENSORBOARD, purge_step=purge_step)
