"""Check every file of a split once, before training reads any: decodable, sizes that agree,
label values in the dataset's label space. A bad file stops the run with one line naming it.

The checks are the datasets' own: each SegmentationFiles' reader (which decodes and compares
sizes) and its LabelSpace, so this works for every loader. Checked samples are recorded in
``verified.json`` in the prepare cache folder, keyed by their files' paths, sizes and
modification times and by the label space; prepare records the files it read and wrote there
too, so a sample is decoded once, whichever of the two saw it first. Under DDP each rank checks
its share and the results are gathered, so every rank stops on the same error.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

from san_fast.data._io import DatasetFileError, SegmentationFiles, check_label_values, sample_files
from san_fast.io_utils import atomic_write_json
from san_fast.worker_threads import worker_options

RECORD = "verified.json"
RECORD_FORMAT = 1
Stamp = list[int]  # size and mtime_ns of each file of a sample


def stamp(files: list[str]) -> Stamp:
    out: Stamp = []
    for path in files:
        st = os.stat(path)
        out += [st.st_size, st.st_mtime_ns]
    return out


class VerifiedRecord:
    """Samples known good: {label space: {file paths joined by newlines: stamp}}."""

    def __init__(self, folder: Optional[str]):
        self.path = os.path.join(folder, RECORD) if folder else None
        self.spaces: dict[str, dict[str, Stamp]] = {}
        if self.path and os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    saved = json.load(f)
                if saved.get("format") == RECORD_FORMAT:
                    self.spaces = saved["spaces"]
            except (OSError, ValueError, KeyError, AttributeError):
                self.spaces = {}  # unreadable: everything is checked again and the record rewritten

    def vouches(self, space: str, files: list[str], current: Stamp) -> bool:
        return self.spaces.get(space, {}).get("\n".join(files)) == current

    def add(self, space: str, entries: Iterable[tuple[list[str], Stamp]]) -> None:
        known = self.spaces.setdefault(space, {})
        for files, st in entries:
            known["\n".join(files)] = list(st)

    def save(self) -> Optional[str]:
        """Write the record; returns why it could not be written (a read-only data folder), or None."""
        if not self.path:
            return None
        try:
            atomic_write_json(self.path, {"format": RECORD_FORMAT, "spaces": self.spaces}, indent=None)
        except OSError as err:
            return str(err)
        return None


def check_sample(files: SegmentationFiles, index: int) -> Optional[str]:
    """None when sample `index` decodes and its label values are valid, else the reason."""
    sample = files.samples[index]
    try:
        _, raw = files.reader(sample)
        paths = sample_files(sample)
        check_label_values(raw, files.labels.valid, paths[-1], files.labels.expected)
    except (DatasetFileError, OSError) as err:
        return str(err).splitlines()[0]
    return None


class _Checks(Dataset):
    """One check per item, so a DataLoader spreads them over its worker processes."""

    def __init__(self, files: SegmentationFiles, indices: list[int]):
        self.files, self.indices = files, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Optional[str]]:
        index = self.indices[i]
        return index, check_sample(self.files, index)


def _as_is(item):
    return item


def check_files(files: SegmentationFiles, indices: list[int], workers: int, desc: str,
                progress: bool) -> list[tuple[int, Optional[str]]]:
    loader = DataLoader(_Checks(files, indices), batch_size=None, collate_fn=_as_is, **worker_options(workers))
    return list(tqdm(loader, total=len(indices), desc=desc, unit="file", leave=False,
                     disable=not progress or not indices))


def file_sets(dataset: Dataset) -> list[SegmentationFiles]:
    """The SegmentationFiles a dataset reads (one, or the parts of a ConcatDataset)."""
    if isinstance(dataset, SegmentationFiles):
        return [dataset]
    if isinstance(dataset, ConcatDataset):
        return [files for part in dataset.datasets for files in file_sets(part)]
    return []


def verify_dataset(dataset: Dataset, split: str, record_folder: Optional[str], workers: int = 0,
                   progress: bool = True, rank: int = 0, world_size: int = 1,
                   gather=lambda obj: [obj]) -> int:
    """Check this rank's share of `dataset`'s samples not yet vouched for; raise DatasetFileError
    (one line) when any is bad. `gather(obj)` returns every rank's obj (all_gather_objects).
    Returns how many samples were checked on all ranks. Datasets that are not files (the
    synthetic scenes) need no check."""
    record = VerifiedRecord(record_folder)
    checked = 0
    for files in file_sets(dataset):
        space = files.labels.expected
        todo, stamps = [], {}
        for index in range(rank, len(files), world_size):
            paths = sample_files(files.samples[index])
            current = stamp(paths)
            if not record.vouches(space, paths, current):
                todo.append(index)
                stamps[index] = (paths, current)
        results = check_files(files, todo, workers, f"checking {files.name} {split} files", progress)
        good = [stamps[i] for i, error in results if error is None]
        everyone = gather((good, [error for _, error in results if error is not None], len(todo)))
        errors = [e for _, errs, _ in everyone for e in errs]
        if errors:
            more = f" (and {len(errors) - 1} more bad files)" if len(errors) > 1 else ""
            raise DatasetFileError(f"{files.name} {split} split: {errors[0]}{more}")
        record.add(space, [entry for g, _, _ in everyone for entry in g])
        checked += sum(n for _, _, n in everyone)
    if rank == 0 and checked:
        why = record.save()
        if why:
            print(f"san_fast: could not record the checked files ({why}); they will be checked again next time")
    return checked
