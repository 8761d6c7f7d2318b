"""Check a dataset's layout, build missing curated lists, and write the loaders' cache.

    python -m san_fast.data.prepare NAME --data-root DIR [--out CACHE] [--protocol P] [--workers N]

NAME is coco27, coco15, coco3, cityscapes, potsdam or potsdam3. The command
- validates the layout and reports file counts per split (against the published counts);
- COCO-Stuff: uses the curated lists in ``cocostuff/curated/`` when present (IIC's, PiCIE's and
  STEGO's published copies), else builds them from the annotations by IIC's rule (both sides
  >= 360 px, >= 75% of pixels in the target classes) into the cache;
- COCO-Stuff and Cityscapes: writes, per protocol, training images resized to the protocol's
  base resolution (JPEG) and evaluation crops (PNG), with coarse label maps (PNG), so that
  training never decodes full-size files. The loaders use the cache when its manifest matches
  the current list and protocol;
- Potsdam: decodes every tile to check it; its 200x200 .mat tiles need no cache.

The cache goes to ``<data-root>/san_fast_cache`` or ``--out`` (then give the loaders the same
folder as ``train.py --data-cache``). Files are written atomically, so an interrupted run resumes where
it stopped; ``--force`` rewrites everything.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from san_fast.config import DATASET_PRESETS, EVAL_PROTOCOLS, OneLineErrorParser
from san_fast.data import cityscapes, coco, potsdam
from san_fast.data._io import (
    CACHE_IMAGE_EXT,
    DatasetFileError,
    DatasetLayoutError,
    LabelSpace,
    SegmentationFiles,
    cache_matches,
    cache_root,
    list_files,
    manifest_path,
    read_id_list,
    read_pair,
    require_dir,
    sample_files,
)
from san_fast.data.jobs import CacheJob, CheckJob, CurateJob, run_job
from san_fast.data.transforms import EvalProtocol, dataset_family, protocol_for
from san_fast.data.verify import VerifiedRecord, stamp
from san_fast.io_utils import atomic_write_json, atomic_write_text

NAMES = ("coco27", "coco15", "coco3", "cityscapes", "potsdam", "potsdam3")


# --- reporting ---------------------------------------------------------------------------------

@dataclass
class Report:
    """What prepare found and did; ``errors`` lists unusable files (path: reason)."""

    dataset: str
    root: str
    cache: Optional[str]
    lines: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # samples read and found good, per label space: training need not decode them again
    vouched: dict[str, list[tuple[list[str], list[int]]]] = field(default_factory=dict)

    def vouch(self, space: str, files: list[str]) -> None:
        self.vouched.setdefault(space, []).append((files, stamp(files)))

    def say(self, line: str, echo: Callable[[str], None]) -> None:
        self.lines.append(line)
        echo(line)


def _published(count: Optional[int]) -> str:
    return f" (published: {count:,})" if count else ""


def _errors_of(results: Sequence[tuple[str, Any]]) -> list[str]:
    return [detail for status, detail in results if status == "error"]


# --- COCO-Stuff ----------------------------------------------------------------------------------

def _coco_list(report: Report, root: str, cache: str, split_dir: str, list_name: str,
               rebuild: bool, workers: int, progress: bool, echo) -> Optional[list[str]]:
    published, built = coco.curated_list_candidates(root, cache, split_dir, list_name)
    if os.path.isfile(published):
        report.say(f"  {split_dir}: curated list {published} (published copy)", echo)
        return _read_list(published)
    if os.path.isfile(built) and not rebuild:
        report.say(f"  {split_dir}: curated list {built} (built earlier by prepare)", echo)
        return _read_list(built)
    label_dir = os.path.join(root, "annotations", split_dir)
    names = sorted(n for n in list_files(label_dir) if n.endswith(".png"))
    job = CurateJob([os.path.join(label_dir, n) for n in names], coco.curation_lut(list_name))
    results = run_job(job, workers, f"curate {split_dir}", progress)
    errors = _errors_of(results)
    if errors:
        report.errors.extend(errors)
        report.say(f"  {split_dir}: {len(errors)} unusable annotations, {list_name} not built", echo)
        return None
    ids = [n[:-4] for n, (_, keep) in zip(names, results) if keep]
    if not ids:
        report.errors.append(f"{label_dir}: none of the {len(names):,} annotations meets IIC's rule "
                             f"(both sides >= 360 px, >= 75% target pixels): {list_name} not built")
        return None
    atomic_write_text(built, "".join(i + "\n" for i in ids))
    report.say(f"  {split_dir}: built {built} by IIC's rule ({len(ids):,} of {len(names):,} "
               "annotated images kept)", echo)
    return ids


def _read_list(path: str) -> list[str]:
    ids = read_id_list(path)  # refuses duplicate ids and ids holding folders
    if not ids:
        raise DatasetFileError(f"curated list {path} is empty: expected one image id per line")
    return ids


def _write_cache(report: Report, protocol: EvalProtocol, folder: str, split: str, ids: list[str],
                 source: SegmentationFiles, manifest: tuple[str, dict], cached: LabelSpace,
                 force: bool, workers: int, progress: bool, echo) -> None:
    path, expected = manifest
    if not force and cache_matches(path, expected, warn=False):
        report.say(f"  cache {folder}: up to date ({len(ids):,} items)", echo)
        return
    ext = CACHE_IMAGE_EXT[split]
    outputs = [(os.path.join(folder, "images", i + ext), os.path.join(folder, "labels", i + ".png"))
               for i in ids]
    job = CacheJob(source, outputs, ext.lstrip("."), force)
    results = run_job(job, workers, f"cache {protocol.name} {os.path.basename(folder)}", progress)
    errors = _errors_of(results)
    written = sum(status == "written" for status, _ in results)
    for index, (status, _) in enumerate(results):
        if status == "written":  # read, checked and written here: both copies are known good
            report.vouch(source.labels.expected, sample_files(source.samples[index]))
            report.vouch(cached.expected, list(outputs[index]))
    if errors:
        report.errors.extend(errors)
        report.say(f"  cache {folder}: {len(errors)} unreadable files, manifest not written", echo)
        return
    atomic_write_json(path, expected)
    report.say(f"  cache {folder}: {len(ids):,} items ({written:,} written, "
               f"{len(ids) - written:,} kept)", echo)


def _prepare_coco(report: Report, name: str, protocols: list[EvalProtocol], cache: str,
                  rebuild: bool, force: bool, write_cache: bool, workers: int, progress: bool,
                  echo) -> None:
    root = report.root
    list_name = coco.CURATED_LISTS[name]
    for split, split_dir in coco.SPLIT_DIRS.items():
        image_dir = require_dir(os.path.join(root, "images", split_dir), coco.TITLE, coco.LAYOUT)
        label_dir = require_dir(os.path.join(root, "annotations", split_dir), coco.TITLE, coco.LAYOUT)
        n_images = sum(n.endswith(".jpg") for n in list_files(image_dir))
        n_labels = sum(n.endswith(".png") for n in list_files(label_dir))
        report.counts[f"{split_dir}/images"] = n_images
        report.counts[f"{split_dir}/annotations"] = n_labels
        report.say(f"  {split_dir}: {n_images:,} images, {n_labels:,} annotation PNGs", echo)
        ids = _coco_list(report, root, cache, split_dir, list_name, rebuild, workers, progress, echo)
        if ids is None:
            continue
        report.counts[f"{split_dir}/{list_name}"] = len(ids)
        report.say(f"  {split_dir}: {len(ids):,} curated images in {list_name}"
                   f"{_published(coco.PUBLISHED_COUNTS.get(list_name, {}).get(split_dir))}", echo)
        pairs = coco.original_pairs(root, split_dir, ids)
        if not write_cache:
            continue
        for protocol in protocols:
            folder = coco.cache_folder(cache, protocol, split_dir)
            source = SegmentationFiles(name, pairs, read_pair, coco.CACHE_LABELS,
                                       protocol.cache_steps(split), source=root)
            manifest = (manifest_path(folder, list_name), coco.cache_manifest(ids, protocol, split))
            _write_cache(report, protocol, folder, split, ids, source, manifest, coco.CACHED_LABELS[name],
                         force, workers, progress, echo)


# --- Cityscapes ---------------------------------------------------------------------------------

def _prepare_cityscapes(report: Report, name: str, protocols: list[EvalProtocol], cache: str,
                        force: bool, write_cache: bool, workers: int, progress: bool, echo) -> None:
    for split, split_dir in cityscapes.SPLIT_DIRS.items():
        items = cityscapes.original_items(report.root, split_dir)
        ids = [stem for stem, _ in items]
        report.counts[split_dir] = len(ids)
        report.say(f"  {split_dir}: {len(ids):,} images with gtFine labels"
                   f"{_published(cityscapes.PUBLISHED_COUNTS[split])}", echo)
        if not write_cache:
            continue
        for protocol in protocols:
            folder = cityscapes.cache_folder(cache, protocol, split_dir)
            source = SegmentationFiles(name, [pair for _, pair in items], read_pair,
                                       cityscapes.CACHE_LABELS, protocol.cache_steps(split),
                                       source=report.root)
            manifest = (manifest_path(folder, cityscapes.MANIFEST_LIST),
                        cityscapes.cache_manifest(ids, protocol, split))
            _write_cache(report, protocol, folder, split, ids, source, manifest, cityscapes.CACHED_LABELS,
                         force, workers, progress, echo)


# --- Potsdam ------------------------------------------------------------------------------------

def _prepare_potsdam(report: Report, name: str, workers: int, progress: bool, echo) -> None:
    for list_name, published in potsdam.PUBLISHED_COUNTS.items():
        tiles = potsdam.tiles(report.root, (list_name,))
        report.counts[list_name] = len(tiles)
        labelled = sum(t.label is not None for t in tiles)
        source = SegmentationFiles(name, tiles, potsdam.read_tile, potsdam.LABELS[name], [],
                                   source=report.root)
        results = run_job(CheckJob(source), workers, f"check {list_name}", progress)
        errors = _errors_of(results)
        report.errors.extend(errors)
        for tile, (status, _) in zip(tiles, results):
            if status == "ok":
                report.vouch(source.labels.expected, sample_files(tile))
        report.say(f"  {list_name}: {len(tiles):,} tiles, {labelled:,} with gt"
                   f"{_published(published)}" + (f", {len(errors)} unreadable" if errors else ""),
                   echo)
    report.say("  no cache needed: .mat tiles load in about 0.1 ms each", echo)


# --- entry points -------------------------------------------------------------------------------

def _protocols(name: str, requested: Optional[str]) -> list[EvalProtocol]:
    if requested is None:
        requested = DATASET_PRESETS.get(name, {}).get("eval_protocol", "picie")
    if requested == "all":
        found = []
        for protocol in EVAL_PROTOCOLS:
            try:
                found.append(protocol_for(name, protocol))
            except ValueError:
                continue  # e.g. iic for Cityscapes, which IIC never evaluated
        return found
    return [protocol_for(name, requested)]


def prepare(name: str, data_root: str, out: Optional[str] = None, protocol: Optional[str] = None,
            workers: Optional[int] = None, rebuild_lists: bool = False, force: bool = False,
            write_cache: bool = True, progress: bool = True,
            echo: Callable[[str], None] = print) -> Report:
    """Run the checks and builds of ``python -m san_fast.data.prepare``; returns the report.
    Layout problems raise DatasetLayoutError; unreadable files are listed in report.errors."""
    if name not in NAMES:
        raise ValueError(f"dataset {name!r}: expected one of {', '.join(NAMES)}")
    if workers is None:
        workers = os.cpu_count() or 1
    family = dataset_family(name)
    protocols = _protocols(name, protocol) if family != "potsdam" else []
    cache = cache_root(data_root, out)
    module = {"cocostuff": coco, "cityscapes": cityscapes, "potsdam": potsdam}[family]
    report = Report(name, module.dataset_root(data_root), cache if protocols else None)
    report.say(f"{name}: {module.TITLE} at {report.root}", echo)
    if family == "cocostuff":
        _prepare_coco(report, name, protocols, cache, rebuild_lists, force, write_cache, workers,
                      progress, echo)
    elif family == "cityscapes":
        _prepare_cityscapes(report, name, protocols, cache, force, write_cache, workers,
                            progress, echo)
    else:
        _prepare_potsdam(report, name, workers, progress, echo)
    _record(report, cache, echo)
    return report


def _record(report: Report, cache: str, echo) -> None:
    """The samples checked here, for training to skip (san_fast/data/verify.py)."""
    if not report.vouched:
        return
    record = VerifiedRecord(cache)
    for space, entries in report.vouched.items():
        record.add(space, entries)
    why = record.save()
    if why:
        report.say(f"  could not record the checked files in {cache} ({why})", echo)


PROG = "python -m san_fast.data.prepare"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog=PROG,
        description="Check a dataset's layout, build missing curated lists, and write the "
                    "loaders' cache (see README, section Datasets).",
    )
    p.add_argument("name", choices=NAMES)
    p.add_argument("--data-root", required=True, help="the folder given to train.py --data-root")
    p.add_argument("--out", default=None,
                   help="cache folder (default <data-root>/san_fast_cache; if set, train with "
                        "train.py --data-cache pointing at it)")
    p.add_argument("--protocol", choices=(*EVAL_PROTOCOLS, "all"), default=None,
                   help="protocol(s) to cache for (default: the dataset's preset)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument("--rebuild-lists", action="store_true",
                   help="rebuild curated lists built earlier (published copies are always used)")
    p.add_argument("--force", action="store_true", help="rewrite cached files that exist")
    p.add_argument("--no-cache", action="store_true", help="only check the layout and lists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers {args.workers}: expected an integer >= 0 (0: in this process)")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is an existing file: expected a folder for the cache")
    try:
        report = prepare(args.name, args.data_root, out=args.out, protocol=args.protocol,
                         workers=args.workers, rebuild_lists=args.rebuild_lists, force=args.force,
                         write_cache=not args.no_cache, progress=not args.quiet)
    except (DatasetLayoutError, DatasetFileError, ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if report.errors:
        shown = "\n  ".join(report.errors[:20])
        more = f"\n  ... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        print(f"{PROG}: error: {len(report.errors)} files could not be used:\n  {shown}{more}",
              file=sys.stderr)
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
