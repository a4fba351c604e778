"""OOM detection is as broad as docs/architecture.md lists, and nothing else counts as an OOM."""

import pytest
import torch

from accum.oom import (
    device_memory_bytes,
    free_memory,
    is_oom,
    peak_memory_bytes,
    reset_peak_memory,
)

OOM_ERRORS = [
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes."),
    RuntimeError("std::bad_alloc"),
    RuntimeError("could not create a primitive"),  # oneDNN under RLIMIT_AS
    RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB)"),
    RuntimeError("XPU out of memory. Tried to allocate 1.00 GiB"),
]


@pytest.mark.parametrize("exc", OOM_ERRORS, ids=lambda e: type(e).__name__ + ":" + str(e)[:30])
def test_oom_messages_are_recognised(exc):
    assert is_oom(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    ValueError("out of memory"),  # not a runtime error: a user's own message
    KeyError("input_ids"),
    TypeError("forward() got an unexpected keyword argument"),
])
def test_other_errors_are_not_oom(exc):
    assert not is_oom(exc)


def test_cpu_peak_resets_and_grows():
    free_memory()
    reset_peak_memory("cpu")
    before = peak_memory_bytes("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = peak_memory_bytes("cpu")
    del block
    free_memory()
    reset_peak_memory("cpu")
    after = peak_memory_bytes("cpu")
    assert grown - before >= 48 * 2**20
    assert after < grown
    assert device_memory_bytes("cpu") > 0
