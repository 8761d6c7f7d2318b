"""One run per --out folder: an exclusive lock while the run lives, and no silent mixing of runs.

A folder that already holds a checkpoint is refused unless the run resumes (--resume) or
starts afresh (--overwrite, which first removes the earlier run's files). The lock is an
fcntl.flock on ``.lock`` inside the folder: the kernel releases it when the process ends,
however it ends (SIGKILL included), so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected against each other
    fcntl = None

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
TENSORBOARD = "tensorboard"  # folder of TensorBoard event files (san_fast.logger)
# Files (and the TensorBoard folder) a run writes; --overwrite removes them so no result of the
# earlier run survives.
RUN_FILES = (CHECKPOINT, CONFIG, METRICS, "predictions.png", "curves.png", "confusion.png", TENSORBOARD)
LOCK = ".lock"


class RunFolderError(ValueError):
    """The --out folder cannot take this run (in use, or holding another run)."""


class RunFolder:
    def __init__(self, path: str, resume: Optional[str], overwrite: bool):
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self._lock_fd: Optional[int] = None

    def file(self, name: str) -> Path:
        return self.path / name

    def check(self) -> None:
        """Read-only: can this run use the folder? (Repeated under the lock by acquire.)"""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is an existing file: expected a folder for the run")
        if (self.file(CHECKPOINT).exists() and self.resume is None and not self.overwrite):
            raise RunFolderError(
                f"--out {self.path} already holds a run ({CHECKPOINT}): pass --resume "
                f"{self.file(CHECKPOINT)} to continue it, --overwrite to replace it, or another --out")

    def acquire(self) -> None:
        """Create the folder, take the lock (or fail at once), then clear it for --overwrite."""
        self.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o644) if fcntl is not None else None
        except OSError as err:
            raise RunFolderError(f"--out {self.path}: cannot create the run folder ({err})") from None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderError(f"--out {self.path} is in use by another run (pid {owner}); "
                                     "wait for it to finish or choose another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._lock_fd = fd
        self.check()  # another run may have written a checkpoint between check() and the lock
        if self.overwrite:
            for name in RUN_FILES:
                path = self.file(name)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
