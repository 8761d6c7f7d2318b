"""Speed of the embedded synthetic dataset and of the k-means baseline (CPU work on any machine)."""

from san_fast.baseline import kmeans_pixel_baseline
from san_fast.data.synthetic import SyntheticScenes


def test_synthetic_generation(benchmark):
    ds = SyntheticScenes(6, 64, 64, seed=0)
    benchmark.pedantic(lambda: [ds[i] for i in range(len(ds))], rounds=3, iterations=1)
    benchmark.extra_info["images_per_second"] = len(ds) / benchmark.stats.stats.median


def test_kmeans_baseline_on_synthetic_default(benchmark):
    train, val = SyntheticScenes(6, 64, 1024, 0), SyntheticScenes(6, 64, 128, 0, split="val")
    result = benchmark.pedantic(lambda: kmeans_pixel_baseline(train, val, 6), rounds=1, iterations=1)
    benchmark.extra_info["acc"] = result["acc"]
    benchmark.extra_info["miou"] = result["miou"]
