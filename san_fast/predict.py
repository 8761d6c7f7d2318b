"""Segment your own images with a trained SAN.

    python -m san_fast.predict --checkpoint runs/latest/checkpoint.pt photos/ extra.jpg --out preds/

Per image: ``<name>_mask.png``, the cluster ids as an indexed PNG (pixel value = cluster id,
coloured by the palette), and ``<name>_overlay.png``, the image beside the image with the
clusters blended in, and a legend; ``predictions.json`` lists them. With ``--assignment`` (a run's metrics.json, or an
evaluation's), clusters are coloured and named by the class they were matched to.

Exit code: 0 when every image was segmented, 1 when some failed (each named on one line), 2
for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from san_fast.api import load, read_assignment
from san_fast.image_files import Decoded, ImageFile, find_images, output_stems, read_image
from san_fast.inference import input_channels
from san_fast.io_utils import atomic_write_json
from san_fast.metrics import UNASSIGNED
from san_fast.viz import UNMATCHED_COLOUR, UNMATCHED_NAME, label_palette, save_indexed_png, save_overlay

# Pillow refuses images above ~179 Mpx as possible decompression bombs; aerial mosaics are
# larger. 2^30 pixels still stops a file that would exhaust memory.
_MAX_PIXELS = 1 << 30


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m san_fast.predict", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, or folders searched recursively for "
                        ".jpg .jpeg .png .tif .tiff .bmp .webp")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("--out", required=True, help="folder for the masks and overlays")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per forward pass (consecutive images of the same size)")
    p.add_argument("--max-side", type=int, default=512,
                   help="longer images are segmented at this many pixels on their longer side and "
                        "the mask is resized back (the model was trained on 128-320 px images); "
                        "0 = full size")
    p.add_argument("--assignment", default=None,
                   help="metrics.json of an evaluation: colour and name clusters by class")
    return p


def _prefetch(files: Sequence[ImageFile], read, depth: int) -> Iterator[tuple[ImageFile, Future]]:
    """Decode up to ``depth`` files ahead in threads (Pillow releases the GIL while decoding),
    yielding them in order; memory stays bounded however many files there are."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque = deque()
        for item in files:
            pending.append((item, pool.submit(read, item.path)))
            if len(pending) >= depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


class _Outputs:
    """Writes each image's mask and overlay, and the records of predictions.json."""

    def __init__(self, out: Path, num_clusters: int, assignment: Optional[list[int]],
                 class_names: Optional[list[str]]):
        self.out = out
        if assignment is None:
            self.lut = np.arange(num_clusters)
            self.shown_palette = label_palette(num_clusters)
            self.names = [f"cluster {k}" for k in range(num_clusters)]
        else:
            # A cluster matched to no class (-1, the strict over-clustering rule) gets an entry
            # of its own after the classes.
            k = len(class_names)
            self.lut = np.where(np.asarray(assignment) == UNASSIGNED, k, assignment)
            self.shown_palette = np.concatenate([label_palette(k), [UNMATCHED_COLOUR]]).astype(np.uint8)
            self.names = list(class_names) + [UNMATCHED_NAME]
        # The mask keeps cluster ids; its palette gives each cluster its class's colour.
        self.mask_palette = self.shown_palette[self.lut]
        self.records: list[dict] = []
        self.failed: list[dict] = []

    def write(self, item: ImageFile, stem: str, decoded: Decoded, labels: np.ndarray) -> None:
        mask = labels.astype(np.uint8)
        if (mask.shape[1], mask.shape[0]) != decoded.size:
            mask = np.asarray(Image.fromarray(mask).resize(decoded.size, Image.NEAREST))
        mask_path = self.out / f"{stem}_mask.png"
        overlay_path = self.out / f"{stem}_overlay.png"
        save_indexed_png(mask_path, mask, self.mask_palette)
        # The overlay is drawn at the segmented size: it is for looking, the mask for using.
        save_overlay(overlay_path, decoded.pixels[..., :3], self.lut[labels], self.shown_palette,
                     self.names, title=item.name)
        ids, counts = np.unique(mask, return_counts=True)
        self.records.append({
            "input": str(item.path), "mask": str(mask_path), "overlay": str(overlay_path),
            "size": list(decoded.size), "segmented_size": [int(labels.shape[1]), int(labels.shape[0])],
            "cluster_fractions": {str(int(k)): round(float(c) / mask.size, 6)
                                  for k, c in zip(ids, counts)},
        })

    def fail(self, path, err: BaseException | str) -> None:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        tqdm.write(f"predict: error: {path}: {reason}", file=sys.stderr)
        self.failed.append({"input": str(path), "error": reason})


def _segment_all(model, files: list[ImageFile], outputs: _Outputs, batch_size: int,
                 max_side: Optional[int]) -> None:
    """Decode ahead, batch consecutive images of one size, segment, write."""
    stems = dict(zip(files, output_stems(files)))
    channels = input_channels(model)

    def flush(batch: list[tuple[ImageFile, Decoded]]) -> None:
        try:
            labels = model.segment(np.stack([d.pixels for _, d in batch]), batch_size=len(batch))
        except (RuntimeError, ValueError) as err:  # e.g. out of device memory: these images fail
            for item, _ in batch:
                outputs.fail(item.path, err)
            return
        for (item, decoded), lab in zip(batch, labels):
            try:
                outputs.write(item, stems[item], decoded, lab)
            except (OSError, ValueError) as err:
                outputs.fail(item.path, err)

    batch: list[tuple[ImageFile, Decoded]] = []
    with tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for item, future in _prefetch(files, lambda p: read_image(p, channels, max_side),
                                      depth=2 * batch_size):
            try:
                decoded = future.result()
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                outputs.fail(item.path, err)
                bar.update(1)
                continue
            if batch and (len(batch) == batch_size
                          or batch[0][1].pixels.shape != decoded.pixels.shape):
                flush(batch)
                bar.update(len(batch))
                batch = []
            batch.append((item, decoded))
        if batch:
            flush(batch)
            bar.update(len(batch))


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"--out {out} cannot be created ({err})") from None


def run(args: argparse.Namespace) -> int:
    files, missing = find_images(args.inputs)
    if not files:
        print(f"predict: error: no image files among the inputs"
              f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is an existing file: expected a folder")
        model = load(args.checkpoint, device=args.device)
        assignment, names = (read_assignment(args.assignment, model.num_semantics)
                             if args.assignment else (None, None))
        _make_folder(out)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"predict: error: {err}", file=sys.stderr)
        return 2
    outputs = _Outputs(out, model.num_semantics, assignment, names)
    for entry in missing:
        outputs.fail(entry, "no such file or folder")
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    _segment_all(model, files, outputs, args.batch_size, args.max_side or None)
    atomic_write_json(out / "predictions.json", {
        "checkpoint": str(args.checkpoint), "num_clusters": model.num_semantics,
        "assignment": assignment, "class_names": names,
        "palette": outputs.mask_palette.tolist(), "images": outputs.records,
        "failed": outputs.failed,
    })
    done, failed = len(outputs.records), len(outputs.failed)
    print(f"segmented {done} of {done + failed} images into {out}"
          + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inputs:
        parser.error("no INPUT given: name image files or folders")
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.batch_size < 1 or args.max_side < 0:
        parser.error("--batch-size must be >= 1 and --max-side >= 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
