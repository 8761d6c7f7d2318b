"""The GPUs the project models: one table of rates and sizes, shared by the SEAT traffic model
(san_fast.kernels.traffic) and the training-step model (bench/step_model.py).

Rates are what a well-written kernel can reach, not the datasheet's peaks: memory bandwidth is
a device-to-device copy's (bytes read plus bytes written per second; DESIGN.md measured
3.0 TB/s on the H100 lent here), dense matrix rates about 70% of the datasheet's (NVIDIA's
datasheets quote the SXM parts; the H100's 989 TFLOP/s bf16 becomes the 700 of the step-model
issue). Sizes (SMs, L2, shared memory per SM) are the datasheets'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The names of the half-precision dtypes in matmul_flops (and in the traffic tables' headers).
HALF_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class GPUSpec:
    name: str
    sms: int
    l2_bytes: int
    smem_per_sm_bytes: int
    hbm_bytes_per_s: float  # achievable: read + write bytes of a large device-to-device copy
    matmul_flops: dict  # achievable dense matmul FLOP/s by operand dtype ("bf16", "fp16", "tf32", "fp32")
    vector_flops: float  # achievable non-tensor-core fp32 FLOP/s (elementwise, reductions)
    bf16: bool  # native bf16 support (V100 has none)
    # Assumed, not measured here: bytes per second between L2 and the SMs on hits. Only the
    # traffic model's informational L2 column uses it (san_fast.kernels.traffic).
    l2_hit_bytes_per_s: float = 0.0

    def __hash__(self) -> int:
        # Hashable despite the dict field, so launch plans can be cached per GPU.
        return hash((self.name, self.sms, self.l2_bytes, self.hbm_bytes_per_s, tuple(sorted(self.matmul_flops.items()))))

    @property
    def amp_dtype(self) -> torch.dtype:
        """The autocast dtype training's --amp auto takes here: bf16, or fp16 where there is none."""
        return torch.bfloat16 if self.bf16 else torch.float16

    def matmul_rate(self, dtype: torch.dtype, allow_tf32: bool = False) -> float:
        key = HALF_DTYPE_KEYS.get(dtype)
        if key is None:
            key = "tf32" if allow_tf32 and "tf32" in self.matmul_flops else "fp32"
        if key == "bf16" and not self.bf16:
            raise ValueError(f"{self.name} has no bf16 support")
        return self.matmul_flops[key]


_MiB = 2**20
GPUS: dict[str, GPUSpec] = {
    "H100": GPUSpec(
        "H100 SXM", sms=132, l2_bytes=50 * _MiB, smem_per_sm_bytes=228 * 1024, hbm_bytes_per_s=3.0e12,
        matmul_flops={"bf16": 700e12, "fp16": 700e12, "tf32": 350e12, "fp32": 50e12}, vector_flops=50e12,
        bf16=True, l2_hit_bytes_per_s=7.0e12,
    ),
    "A100": GPUSpec(
        "A100 SXM 80GB", sms=108, l2_bytes=40 * _MiB, smem_per_sm_bytes=164 * 1024, hbm_bytes_per_s=1.75e12,
        matmul_flops={"bf16": 220e12, "fp16": 220e12, "tf32": 110e12, "fp32": 14e12}, vector_flops=14e12,
        bf16=True, l2_hit_bytes_per_s=4.5e12,
    ),
    "V100": GPUSpec(
        "V100 SXM2", sms=80, l2_bytes=6 * _MiB, smem_per_sm_bytes=96 * 1024, hbm_bytes_per_s=0.8e12,
        matmul_flops={"fp16": 90e12, "fp32": 11e12}, vector_flops=11e12, bf16=False,
        l2_hit_bytes_per_s=2.2e12,
    ),
}


def gpu_spec(name: str) -> GPUSpec:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}: expected one of {', '.join(GPUS)}") from None


def spec_for_device(device: torch.device) -> GPUSpec:
    """The table's entry for a CUDA device by its name (H200 counts as H100: same SMs and L2,
    faster memory, which a benchmark measures anyway), with the device's own SM count."""
    props = torch.cuda.get_device_properties(device)
    name = props.name.upper()
    key = next((k for k in ("H100", "H200", "A100", "V100") if k in name), None)
    key = "H100" if key in (None, "H200") else key
    base = GPUS[key]
    return GPUSpec(props.name, props.multi_processor_count, getattr(props, "L2_cache_size", base.l2_bytes),
                   base.smem_per_sm_bytes, base.hbm_bytes_per_s, base.matmul_flops, base.vector_flops,
                   props.major >= 8, base.l2_hit_bytes_per_s)
