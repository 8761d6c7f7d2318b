"""Launch policy shared by the SEAT kernels: tile sizes, autotune configs, dot precision, grids.

Everything here runs on the host. The kernels themselves live in seat_forward.py,
seat_backward.py and seat_fused_loss.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# C (output channels of the 1x1 conv) is at most 8; tl.dot needs every dimension >= 16.
BLOCK_C = 16
MAX_N = 256
MAX_C = 8
MIN_P = 16

# Upper bound on the backward's fp32 partial sums (per program: N x P for dGamma plus
# 2 x C x P for dW), as a fraction of the bytes of Q: with the fused loss's other buffers the
# op stays within about 5% of Q. Fewer programs per image means less
# parallelism; the cap only binds for small batches or large N (see README.md).
WORKSPACE_FRACTION = 0.035


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def identity_launch(kernel):
    """Default `launch` of the launchers: run the kernel as is (ops.py passes wrap_triton)."""
    return kernel


def block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs keep float64 end to end so that gradcheck can run the real kernels.
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(q: torch.Tensor) -> str:
    """fp32 tl.dot precision: follow torch's own matmul setting, so the default ("highest")
    stays IEEE fp32 and `torch.set_float32_matmul_precision("high")` opts into TF32."""
    if q.dtype != torch.float32 or interpreting() or q.device.type != "cuda":
        return "ieee"
    if torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    major, _ = torch.cuda.get_device_capability(q.device)
    return "tf32" if major >= 8 else "ieee"


def _configs(triples):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_P": p}, num_warps=w, num_stages=s) for m, p, w, s in triples
    ]


# (BLOCK_M, BLOCK_P, num_warps, num_stages) per padded-N bucket. The logits tile
# BLOCK_M x BLOCK_N stays in registers for the whole P loop, so BLOCK_M shrinks as N grows.
# Chosen from offline compiles (`python -m san_fast.kernels.compile_report`: ptxas register
# and spill reports, shared memory that fits sm70's 96 KiB in at least one config per bucket);
# the autotuner picks among them on the GPU.
_FORWARD_TRIPLES = {
    32: [(128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
    128: [(32, 64, 4, 3), (64, 64, 8, 3), (32, 64, 8, 3)],
    256: [(32, 64, 8, 3), (64, 32, 8, 2), (16, 64, 4, 3)],
}
# The backward also holds dl (BLOCK_M x BLOCK_N) across the second P loop, plus a dq tile and
# a read-modify-written dGamma tile (BLOCK_N x BLOCK_P): BLOCK_P shrinks as N grows.
_BACKWARD_TRIPLES = {
    32: [(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    64: [(64, 32, 8, 2), (32, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 16, 8, 3)],
    128: [(32, 32, 8, 2), (16, 64, 8, 3), (32, 64, 8, 3), (32, 16, 8, 3), (16, 16, 8, 2)],
    256: [(16, 16, 8, 3), (16, 32, 8, 2), (32, 16, 8, 3), (16, 16, 8, 2)],
}
# The fused loss adds the forward's softmax and the residuals to the same kernel: more
# pressure, so the configs that spilled least there. The last ones of each list (BLOCK_P = 16)
# are the pipelined configs that spill least for sm90 bf16 under triton 3.6 (compile_report.py).
_LOSS_TRIPLES = {
    32: [(128, 32, 8, 2), (64, 32, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (128, 16, 8, 3), (64, 16, 8, 3)],
    64: [(32, 64, 8, 3), (64, 32, 8, 2), (64, 32, 8, 3), (32, 16, 8, 2)],
    128: [(32, 16, 8, 3), (16, 64, 8, 3), (32, 32, 8, 3), (16, 16, 8, 2)],
    256: [(16, 16, 8, 3), (16, 32, 8, 3), (16, 16, 8, 2)],
}
_TRIPLES = {"forward": _FORWARD_TRIPLES, "backward": _BACKWARD_TRIPLES, "loss": _LOSS_TRIPLES}
_KEYS = {"forward": ["N", "P", "C", "LABELS"], "backward": ["N", "P", "C", "MODE"], "loss": ["N", "P", "C", "MODE"]}
# Under the interpreter every program runs in numpy one after another: large tiles, one config
# (autotuning several configs does not work there).
_INTERPRETER_TRIPLE = (64, 64, 4, 1)


def _bucket(bn: int) -> int:
    return max(32, bn)


def configs(kind: str, bn: int):
    if interpreting():
        return _configs([_INTERPRETER_TRIPLE])
    return _configs(_TRIPLES[kind][_bucket(bn)])


def max_block_m(kind: str, bn: int) -> int:
    return max(cfg.kwargs["BLOCK_M"] for cfg in configs(kind, bn))


_AUTOTUNED: dict = {}


def autotuned(kernel, kind: str, bn: int):
    """One autotuner per (kernel, kind, N bucket), each with the configs that fit that N."""
    key = (kernel, kind, _bucket(bn), interpreting())
    if key not in _AUTOTUNED:
        _AUTOTUNED[key] = triton.autotune(configs=configs(kind, bn), key=_KEYS[kind])(kernel)
    return _AUTOTUNED[key]


def programs_per_image(
    q_rows: torch.Tensor, n: int, c: int, bn: int, kind: str, requested: int | None = None
) -> int:
    """Persistent-grid width G of the backward: programs per image, each looping over row blocks.

    Every program must own at least one row block under every autotune config (it initialises
    its own partial-sum slice on its first block), hence the cap by the largest BLOCK_M.
    """
    b, m, p = q_rows.shape
    most = max(1, triton.cdiv(m, max_block_m(kind, bn)))
    if requested is not None:
        return max(1, min(int(requested), most))
    if q_rows.device.type == "cuda":
        sms = torch.cuda.get_device_properties(q_rows.device).multi_processor_count
        # Rounded down: at the backward's register use one or two programs fit per SM, and
        # B*G just above 2 x SMs (B=16, 132 SMs: 272 for cdiv) would add a nearly empty wave.
        target = max(1, (2 * sms) // b)
    else:
        target = 2
    per_program = (n + 2 * c) * p * 4
    budget = int(WORKSPACE_FRACTION * q_rows.numel() * q_rows.element_size()) // (b * per_program)
    return max(1, min(target, most, budget))


def chosen_configs(kinds: tuple[str, ...] = ("forward", "backward", "loss")) -> dict[str, str]:
    """The configs the autotuners of `kinds` have picked so far, by N bucket and autotune key
    (the benchmarks record them, so a timing can be matched with compile_report.py's registers
    and spills for that config). A single-config autotuner (the interpreter's) never tunes."""
    out = {}
    for (_, kind, bucket, _), tuner in _AUTOTUNED.items():
        if kind not in kinds:
            continue
        picks = dict(getattr(tuner, "cache", None) or {})
        if not picks and len(tuner.configs) == 1:
            picks = {"only config": tuner.configs[0]}
        for key, cfg in picks.items():
            out[f"{kind} N<={bucket} {key}"] = (
                f"M={cfg.kwargs['BLOCK_M']},P={cfg.kwargs['BLOCK_P']},w={cfg.num_warps},s={cfg.num_stages}"
            )
    return out
