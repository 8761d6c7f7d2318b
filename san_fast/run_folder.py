"""One run per --out folder: an exclusive lock while the run lives, and no silent mixing of runs.

A folder that already holds a checkpoint is refused unless the run resumes (--resume) or
starts afresh (--overwrite, which first removes the earlier run's files). The lock is an
fcntl.flock on ``.lock`` inside the folder: the kernel releases it when the process ends,
however it ends (SIGKILL included), so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from san_fast.step_profile import TRACE_FILE

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected against each other
    fcntl = None

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
# Config fields a resumed run may change (how long and how it runs, where it reads and writes);
# every other field shapes the model, the data or the optimisation.
RUN_CONTROL_FIELDS = frozenset({
    "epochs", "max_steps", "eval_every", "save_every", "log_every", "out", "resume", "overwrite",
    "num_workers", "device", "num_vis", "baseline", "logger", "data_root", "data_cache", "compile",
    "compile_mode", "channels_last", "attn", "seat_impl", "fold_bn", "amp", "preset",
})


def differing_settings(a: dict, b: dict) -> list[str]:
    """Fields of config dict `a` whose value in `b` differs, run-control fields left out."""
    return [k for k, v in a.items() if k not in RUN_CONTROL_FIELDS and b.get(k) != v]


METRICS = "metrics.json"
TENSORBOARD = "tensorboard"  # folder of TensorBoard event files (san_fast.logger)
# Files (and the TensorBoard folder) a run writes; --overwrite removes them so no result of the
# earlier run survives.
RUN_FILES = (CHECKPOINT, CONFIG, METRICS, "predictions.png", "curves.png", "confusion.png", TENSORBOARD, TRACE_FILE)
LOCK = ".lock"


class RunFolderError(ValueError):
    """The --out folder cannot take this run (in use, or holding another run)."""


def _same_file(a: Path, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class RunFolder:
    def __init__(self, path: str, resume: Optional[str], overwrite: bool, resume_config: Optional[dict] = None):
        """`resume_config`: the config dict inside the --resume checkpoint."""
        self.path = Path(path)
        self.resume = resume
        self.resume_config = resume_config
        self.overwrite = overwrite
        self._lock_fd: Optional[int] = None

    def file(self, name: str) -> Path:
        return self.path / name

    def check(self) -> None:
        """Read-only: can this run use the folder? (Repeated under the lock by acquire.)"""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is an existing file: expected a folder for the run")
        held = self.file(CHECKPOINT)
        if held.exists() and self.resume is None and not self.overwrite:
            raise RunFolderError(
                f"--out {self.path} already holds a run ({CHECKPOINT}): pass --resume "
                f"{held} to continue it, --overwrite to replace it, or another --out")
        # Resuming one run into the folder of another would mix their files. An earlier
        # checkpoint of the folder's own run (same settings) may roll it back.
        if held.exists() and self.resume_config is not None and not _same_file(held, self.resume):
            why = self._why_another_run()
            if why:
                raise RunFolderError(f"--out {self.path} holds another run than --resume {self.resume} ({why}): "
                                     "resume into the checkpoint's own folder or into an empty --out")

    def _why_another_run(self) -> Optional[str]:
        """Why the folder's run is not the resumed checkpoint's: settings (not run-control flags)
        where its config.json, written with its checkpoint, differs; None when they agree."""
        try:
            held = json.loads(self.file(CONFIG).read_text())
        except (OSError, ValueError):
            return f"it has no readable {CONFIG}"
        resumed = json.loads(json.dumps(self.resume_config))  # as config.json holds it (tuples as lists)
        differ = sorted(differing_settings(resumed, held))
        return f"its {CONFIG} differs in {', '.join(differ)}" if differ else None

    def check_not_in_use(self) -> None:
        """Fail at once when a live run holds the folder's lock, rather than after this run's data
        checks (acquire takes the lock itself only then). A shared lock, dropped at once: it
        writes nothing. Call it from one process (rank 0): two probes never conflict, but a
        probe meeting this run's own acquire would."""
        if fcntl is None or not self.file(LOCK).exists():
            return
        try:
            fd = os.open(self.file(LOCK), os.O_RDONLY)
        except OSError:
            return  # unreadable: acquire reports what is wrong
        self._lock_or_close(fd, fcntl.LOCK_SH)
        os.close(fd)

    def _lock_or_close(self, fd: int, mode: int) -> None:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"--out {self.path} is in use by another run (pid {owner}); "
                                 "wait for it to finish or choose another --out") from None

    def acquire(self) -> None:
        """Create the folder, take the lock (or fail at once), then clear it for --overwrite."""
        self.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o644) if fcntl is not None else None
        except OSError as err:
            raise RunFolderError(f"--out {self.path}: cannot create the run folder ({err})") from None
        if fd is not None:
            self._lock_or_close(fd, fcntl.LOCK_EX)
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
