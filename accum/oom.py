"""What an out-of-memory error looks like, and how to measure and free memory: the one place that knows.

Peak memory on CUDA comes from torch.cuda's allocator statistics: what the caching allocator
*reserved* (what runs out; it holds fragmentation and cached blocks beside what tensors hold), or
what tensors held (`reserved=False`). On CPU it is the process's resident high-water mark (VmHWM),
which `reset_peak_memory` resets through /proc/self/clear_refs.

A step's memory, as the planner and memory pressure compare it with a budget
(`start_peak_measurement` / `measured_peak`): on CUDA the reserved peak (the device is the run's
alone); on CPU the growth of the resident set over what the process held when the measurement
started, so that a plan does not depend on what else the process happened to hold (the model's
weights, a data set in memory, a snapshot of the optimizer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import re
from pathlib import Path

import torch

from accum.errors import ConfigError

logger = logging.getLogger(__name__)

# Substrings of the messages that PyTorch, its backends and the C++ runtime use for "no memory".
# CUDNN_STATUS_NOT_SUPPORTED is cuDNN's OOM in disguise (it fails to allocate a workspace), and
# oneDNN's "could not create a primitive" is the CPU's: measured here with MiniLM under RLIMIT_AS,
# where its scratch allocation fails (make bench's planner runs).
OOM_MESSAGES = (
    "out of memory",  # CUDA, HIP, XPU, "CUDA error: out of memory", "MPS backend out of memory"
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_SUPPORTED",
    "DefaultCPUAllocator: can't allocate memory",
    "std::bad_alloc",
    "PT_DEVMEM Allocation failed",  # HPU
    "Cannot allocate memory",  # ENOMEM surfacing through other C++ paths
    "could not create a primitive",  # oneDNN (CPU matmul/linear) when its scratch allocation fails
)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_warned_no_reset = False


def is_oom(exc: BaseException) -> bool:
    """True when `exc` means the device or process ran out of memory; any other error is False.

    Recognises `MemoryError`, `torch.OutOfMemoryError` and the RuntimeError messages of CUDA,
    cuBLAS, cuDNN, MPS, XPU, HPU and the CPU allocator (including `std::bad_alloc`).
    """
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if not isinstance(exc, (RuntimeError, OSError)):
        return False
    text = str(exc)
    return any(message.lower() in text.lower() for message in OOM_MESSAGES)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _mkl_free_buffers():
    """MKL's `mkl_free_buffers` inside torch's CPU library (statically linked, exported as
    mkl_serv_free_buffers), or None where torch is not built with MKL."""
    import os

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return getattr(ctypes.CDLL(path), "mkl_serv_free_buffers", None)
    except OSError:
        return None


# MKL's memory manager keeps per-thread GEMM buffers after the first matmuls of a new size (about
# 6 MiB each, measured with a 4096-wide output): a probing process then holds memory that a fresh
# training process does not, and every later probe has that much less room (the search said 34
# where a fresh process fits 36). Freeing them between probes keeps the probes' verdicts those of
# a fresh process.
_MKL_FREE_BUFFERS = _mkl_free_buffers()


def free_memory(full: bool = True) -> None:
    """Collect garbage and hand cached memory back: CUDA's cache, and glibc's free heap pages.

    `full=False` collects only the young generations (0.1 ms instead of ~0.2 s once transformers
    is imported), enough between steps whose tensors die by reference counting.
    Call it outside an `except` block: the traceback keeps the failed step's tensors alive.
    """
    gc.collect() if full else gc.collect(1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()
    if _MKL_FREE_BUFFERS is not None:
        _MKL_FREE_BUFFERS()
    # glibc keeps freed heap memory; without a trim the next probe's peak would include it.
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _meminfo_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_memory_bytes(device: torch.device | str | None = None) -> int:
    """Memory in use now, in bytes: CUDA allocated, or this process's resident set (VmRSS) on CPU."""
    device = _as_device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_memory_bytes(device: torch.device | str | None = None, reserved: bool = True) -> int:
    """Peak memory since the last `reset_peak_memory`, in bytes.

    CUDA: `torch.cuda.max_memory_reserved` (or `max_memory_allocated` with reserved=False). CPU:
    this process's resident high-water mark (VmHWM), 0 where /proc is not readable.
    """
    device = _as_device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device) if reserved else torch.cuda.max_memory_allocated(device))
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else 0


def start_peak_measurement(device: torch.device | str | None = None) -> int:
    """Reset the peak and return the baseline a step's memory is counted from: on CPU the resident
    set now (a step counts its growth over it), on CUDA 0 (the reserved peak counts whole)."""
    device = _as_device(device)
    reset_peak_memory(device)
    return 0 if device.type == "cuda" else current_memory_bytes(device)


def measured_peak(device: torch.device | str | None, baseline: int) -> int:
    """The peak since `start_peak_measurement` returned `baseline`, counted as a budget counts it."""
    return max(0, peak_memory_bytes(device) - baseline)


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start a new peak measurement. On CPU, writes 5 to /proc/self/clear_refs (Linux); where
    that is not allowed the peak stays the process's lifetime high-water mark (an over-estimate,
    so a budget check errs on the safe side), reported once in the log."""
    global _warned_no_reset
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError as exc:
        if not _warned_no_reset:
            logger.warning("cannot reset peak memory (%s): CPU peaks are lifetime high-water marks", exc)
            _warned_no_reset = True


def device_memory_bytes(device: torch.device | str | None = None) -> int:
    """Memory the device offers, in bytes: CUDA total memory, or MemAvailable on CPU (0 if unknown)."""
    device = _as_device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    kib = _meminfo_kib("MemAvailable")
    return kib * 1024 if kib is not None else 0


def device_total_bytes(device: torch.device | str | None = None) -> int:
    """A stable size of the device, in bytes, for cache keys: CUDA total, or MemTotal on CPU."""
    device = _as_device(device)
    if device.type == "cuda":
        return device_memory_bytes(device)
    kib = _meminfo_kib("MemTotal")
    return kib * 1024 if kib is not None else 0


def device_name(device: torch.device | str | None = None) -> str:
    """A short name of the device for cache keys and banners, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'."""
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: str | float | int) -> float:
    """Return bytes for '8GiB' / '512MB' / 1e9, or a fraction in (0, 1] for 0.5. Raises ConfigError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _MEMORY_UNITS:
            raise ConfigError(f"memory {value!r} is not a size: write e.g. 8GiB, 512MB, or a fraction like 0.5")
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"memory {value!r} must be a positive, finite size")
    size = number * _MEMORY_UNITS[unit]
    if not math.isfinite(size):
        raise ConfigError(f"memory {value!r} is too large to be a size")
    return size
