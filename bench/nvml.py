"""The GPU as NVML sees it (nvidia-ml-py): name, driver, clocks, and a busy-% sampler thread.

NVML reads the card without a CUDA context, so the GPU check's runner can record the machine
and watch a training subprocess without taking GPU memory. Every function degrades to None
(with the reason) when nvidia-ml-py or a GPU is missing.
"""

from __future__ import annotations

import threading
import time
from typing import Optional


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU
        return None, f"NVML unavailable ({type(exc).__name__})"
    return pynvml, None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_info(index: int = 0) -> dict:
    """Name, driver, memory, clocks, temperature and power of GPU `index`, or {"error": why}."""
    nvml, why = _nvml()
    if nvml is None:
        return {"error": why}
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        info = {
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "memory_total_bytes": int(memory.total),
            "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "max_sm_clock_mhz": nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM),
            "memory_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "temperature_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        }
        try:
            info["compute_capability"] = list(nvml.nvmlDeviceGetCudaComputeCapability(handle))
        except Exception:  # older drivers lack the call; the stages read it from torch anyway
            pass
        return info
    except Exception as exc:
        return {"error": f"NVML query failed ({type(exc).__name__}: {exc})"}
    finally:
        nvml.nvmlShutdown()


class BusySampler:
    """Samples the GPU's utilisation (% of time a kernel was running) every `interval` seconds
    in a background thread; `samples` holds (time.time(), percent) pairs.

    Use as a context manager around a subprocess; `error` says why nothing was sampled."""

    def __init__(self, index: int = 0, interval: float = 0.1):
        self.index, self.interval = index, interval
        self.samples: list[tuple[float, float]] = []
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "BusySampler":
        nvml, why = _nvml()
        if nvml is None:
            self.error = why
            return self
        self._thread = threading.Thread(target=self._run, args=(nvml,), daemon=True)
        self._thread.start()
        return self

    def _run(self, nvml) -> None:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
            while not self._stop.is_set():
                self.samples.append((time.time(), float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)))
                self._stop.wait(self.interval)
        except Exception as exc:
            self.error = f"NVML sampling failed ({type(exc).__name__}: {exc})"
        finally:
            nvml.nvmlShutdown()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self, window: Optional[tuple[float, float]] = None) -> Optional[float]:
        """Mean busy % over the samples inside `window` (unix seconds), or all samples."""
        values = [u for t, u in self.samples if window is None or window[0] <= t <= window[1]]
        return sum(values) / len(values) if values else None
