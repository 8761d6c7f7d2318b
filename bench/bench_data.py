"""Data throughput: images per second from disk to ready training batches.

A 64-image COCO-Stuff fixture (640x480 JPEGs, like COCO's) is read through a torch DataLoader
at num_workers 0 and 2, from the original files and from the prepare cache (short side 320,
the picie protocol). images/s goes to benchmark.extra_info.

    .venv/bin/pytest bench/bench_data.py --benchmark-only
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from san_fast.config import Config
from san_fast.data import build_dataset, coco
from san_fast.data.prepare import prepare

N_IMAGES = 64
BATCH = 16
CROP = 128


def _photo_like(rng, h, w):
    """Smooth colour gradients plus mild noise: JPEG sizes and decode times close to photos,
    unlike pure noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=2) * rng.uniform(80, 200, 3)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def coco_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_bench")
    base = root / "cocostuff"
    rng = np.random.default_rng(0)
    ids = {"train2017": [f"{k:012d}" for k in range(N_IMAGES)], "val2017": [f"{k:012d}" for k in range(4)]}
    for split_dir, split_ids in ids.items():
        for folder in ("images", "annotations", "curated"):
            os.makedirs(base / folder / split_dir)
        for i in split_ids:
            Image.fromarray(_photo_like(rng, 480, 640)).save(base / "images" / split_dir / f"{i}.jpg",
                                                             quality=90)
            label = rng.integers(91, 182, (6, 8), dtype=np.uint8).repeat(80, 0).repeat(80, 1)
            Image.fromarray(label).save(base / "annotations" / split_dir / f"{i}.png")
        (base / "curated" / split_dir / coco.LIST_27).write_text("".join(i + "\n" for i in split_ids))
    prepare("coco27", str(root), workers=2, progress=False, echo=lambda line: None)
    return root


@pytest.mark.parametrize("cached", [False, True], ids=["originals", "cache"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_batches_per_second(benchmark, coco_fixture, num_workers, cached):
    cfg = Config(dataset="coco27", data_root=str(coco_fixture), crop_size=CROP, eval_protocol="picie",
                 num_workers=num_workers)
    if not cached:
        cfg.data_cache = str(coco_fixture / "no-cache")
    dataset = build_dataset(cfg, "train")
    assert ("san_fast_cache" in dataset.source) == cached
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                                         num_workers=num_workers, persistent_workers=num_workers > 0)

    def epoch():
        seen = 0
        for images, labels in loader:
            seen += images.shape[0]
        return seen

    epoch()  # starts the workers and warms the page cache
    seen = benchmark.pedantic(epoch, rounds=3, iterations=1)
    assert seen == N_IMAGES
    rate = N_IMAGES / benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "images_per_s": round(rate, 1), "num_workers": num_workers, "cache": cached,
        "protocol": "picie", "crop": CROP, "source_image": "640x480 JPEG",
        # num_workers=0 collates in this process, where torch's intra-op threads apply
        "torch_threads": torch.get_num_threads(),
    })


@pytest.mark.parametrize("num_workers", [0, 2])
def test_synthetic_train_batches_per_second(benchmark, num_workers):
    """The embedded default's training loader (san_fast.loader, its workers' BLAS pools at one
    thread each) at the paper's crop and batch."""
    from san_fast.config import resolve
    from san_fast.distributed import DistEnv
    from san_fast.loader import train_loader
    from san_fast.runtime import build_runtime

    cfg = resolve(dict(preset="paper", dataset="synthetic", crop_size=CROP, batch_size=BATCH, device="cpu",
                       synthetic_train_size=N_IMAGES * 4, num_workers=num_workers), cuda_available=False)
    loader = train_loader(cfg, build_dataset(cfg, "train"), DistEnv(), build_runtime(cfg))

    def epoch():
        loader.batch_sampler.set_epoch(1)
        return sum(images.shape[0] for images, _ in loader)

    epoch()  # starts the workers
    seen = benchmark.pedantic(epoch, rounds=3, iterations=1)
    assert seen == N_IMAGES * 4
    benchmark.extra_info.update({"images_per_s": round(seen / benchmark.stats.stats.mean, 1),
                                 "num_workers": num_workers, "crop": CROP, "source_image": "synthetic scene"})
