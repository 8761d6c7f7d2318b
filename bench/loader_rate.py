"""How fast the training loader alone delivers batches: images/s of a train.py configuration's
data pipeline (dataset, crops, workers, pinning) with no model. A training step can be no
faster than batch / this rate, so bench/train_rows.py measures it beside the rows: where a row's
step comes close to that bound, the row measured the loader, not the GPU.

    python -m bench.loader_rate --num-workers 8 [--batches 96] [train.py flags ...]
"""

from __future__ import annotations

import argparse
import time

from san_fast.config import config_from_args
from san_fast.data import build_dataset
from san_fast.distributed import DistEnv
from san_fast.loader import train_loader
from san_fast.runtime import build_runtime


def loader_rate(flags: list[str], batches: int = 96) -> dict:
    """images/s of the training loader for train.py `flags`, timed over `batches` batches after
    the ones the workers had prefetched while starting (2 per worker); a split shorter than that
    runs more epochs, as training would."""
    cfg = config_from_args(flags)
    dataset = build_dataset(cfg, "train")
    loader = train_loader(cfg, dataset, DistEnv(), build_runtime(cfg))
    if loader.batch_sampler.per_epoch < 1:
        raise ValueError(f"the training split has {len(dataset)} images, fewer than one batch of {cfg.batch_size}")
    skip, timed, epoch, tic = 2 * cfg.num_workers + 1, 0, 1, 0.0
    while timed < batches:
        loader.batch_sampler.set_epoch(epoch)
        for _ in loader:
            if skip:
                skip -= 1
                tic = time.perf_counter()
                continue
            timed += 1
            if timed == batches:
                break
        epoch += 1
    seconds = time.perf_counter() - tic
    rate = batches * cfg.batch_size / seconds
    return {"images_per_second": round(rate, 1), "batches": batches, "batch_size": cfg.batch_size,
            "num_workers": cfg.num_workers, "pinned": bool(loader.pin_memory),
            "fastest_step_ms": round(1e3 * cfg.batch_size / rate, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=96)
    args, flags = p.parse_known_args(argv)
    r = loader_rate(flags, args.batches)
    print(f"training loader: {r['images_per_second']:.0f} images/s with {r['num_workers']} workers "
          f"(batch {r['batch_size']}, {r['batches']} batches timed): no step faster than {r['fastest_step_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
