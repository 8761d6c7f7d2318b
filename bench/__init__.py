"""Benchmarks (pytest-benchmark, `pytest bench/ --benchmark-only`), the training-step model, and
the one-call GPU check (`bash bench/gpu_check.sh DIR`) with its stages."""
