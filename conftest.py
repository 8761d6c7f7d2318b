"""Shared by tests/ and bench/: run Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before the first @triton.jit function is defined, which is why it
is set here, at collection time, before any san_fast.kernels module is imported.
"""

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Same random draws in every test whatever ran before it, so a tolerance that holds once holds in CI."""
    import torch

    torch.manual_seed(0)
    yield
