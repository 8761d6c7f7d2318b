"""Atomic file writers: a reader (or a crash) sees the old file or the new one, never half of one.

Each writer fills a temporary file in the destination's own folder (``os.replace`` is only
atomic within one filesystem), flushes and fsyncs it, renames it over the destination, then
fsyncs the folder so the rename itself survives a power cut. On any error the temporary file
is removed and the destination is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

import torch
from PIL import Image

PathLike = Union[str, "os.PathLike[str]"]

# mkstemp creates files readable by the owner only; give results the mode a plain open()
# would. The umask can only be read by setting it, so read it once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file, then move it onto ``path``. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2, allow_nan: bool = True) -> Path:
    """JSON in the object's own key order. It is serialised before the file is touched, so an
    object json cannot encode (a tensor, or NaN with ``allow_nan=False``) raises and leaves an
    existing file alone. NaN is allowed by default, as in ``json.dumps``: a diverged run's
    losses should be recorded, not crash the run."""
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n"
    return atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_image(path: PathLike, image: Image.Image, format: Optional[str] = None) -> Path:
    """Save a PIL image; the format comes from the file suffix unless given."""
    if format is None:
        suffix = Path(path).suffix.lower()
        format = Image.registered_extensions().get(suffix)
        if format is None:
            raise ValueError(f"cannot tell an image format from the suffix of {path!s}: "
                             "use .png, .jpg, ... or pass format=")
    return atomic_write(path, lambda f: image.save(f, format=format))
