"""The per-file work of ``python -m san_fast.data.prepare``, spread over worker processes: building
a curated list by IIC's rule, writing the cache, checking files. Each job maps an item index to
(status, detail); ``run_job`` runs one in order, serially or in a process pool.
"""

from __future__ import annotations

import abc
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from san_fast.data import coco
from san_fast.data._io import (
    DatasetFileError,
    LabelSpace,
    SegmentationFiles,
    check_label_values,
    read_label_png,
    save_array_image,
)

READ_ERRORS = (DatasetFileError, OSError)


class _Job(abc.ABC):
    """Work over ``len(self)`` items; ``run(i)`` returns (status, detail)."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def run(self, index: int) -> tuple[str, Any]: ...


@dataclass
class CurateJob(_Job):
    label_paths: list[str]
    target_lut: np.ndarray
    labels: LabelSpace = field(default_factory=lambda: coco.CACHE_LABELS)  # raw values allowed (fine ids)

    def __len__(self) -> int:
        return len(self.label_paths)

    def run(self, index: int) -> tuple[str, Any]:
        path = self.label_paths[index]
        try:
            label = read_label_png(path)
            # Checked before the rule counts pixels: labels in another format (e.g. the
            # stuff-only maps, values 1-183) would otherwise give a plausible but wrong list.
            check_label_values(label, self.labels.valid, path, self.labels.expected)
        except READ_ERRORS as err:
            return "error", str(err)
        return "ok", coco.meets_curation_rule(label, self.target_lut)


@dataclass
class CacheJob(_Job):
    source: SegmentationFiles  # decodes, checks, maps labels and applies the cache steps
    outputs: list[tuple[str, str]]  # (image path, label path) per item
    image_format: str
    force: bool

    def __len__(self) -> int:
        return len(self.outputs)

    def run(self, index: int) -> tuple[str, Any]:
        image_path, label_path = self.outputs[index]
        if not self.force and os.path.isfile(image_path) and os.path.isfile(label_path):
            return "kept", None
        try:
            image, label = self.source.load(index)
        except READ_ERRORS as err:
            return "error", str(err)
        save_array_image(image_path, np.ascontiguousarray(image), self.image_format)
        save_array_image(label_path, np.ascontiguousarray(label), "png")
        return "written", None


@dataclass
class CheckJob(_Job):
    source: SegmentationFiles

    def __len__(self) -> int:
        return len(self.source)

    def run(self, index: int) -> tuple[str, Any]:
        try:
            self.source.load(index)
        except READ_ERRORS as err:
            return "error", str(err)
        return "ok", None


_JOB: Optional[_Job] = None


def _set_job(job: Optional[_Job]) -> None:
    global _JOB
    _JOB = job


def _run(index: int) -> tuple[str, Any]:
    assert _JOB is not None
    return _JOB.run(index)


def run_job(job: _Job, workers: int, desc: str, progress: bool) -> list[tuple[str, Any]]:
    """Results in item order. The job is sent once to each worker process (initializer), not
    once per item."""
    n = len(job)
    bar = tqdm(total=n, desc=desc, unit="file", disable=not progress or n == 0, leave=False)
    try:
        if workers <= 1 or n < 64:
            _set_job(job)
            results = []
            for i in range(n):
                results.append(_run(i))
                bar.update()
            return results
        with ProcessPoolExecutor(workers, initializer=_set_job, initargs=(job,)) as pool:
            results = []
            for result in pool.map(_run, range(n), chunksize=max(1, min(64, n // (4 * workers)))):
                results.append(result)
                bar.update()
            return results
    finally:
        bar.close()
        _set_job(None)
