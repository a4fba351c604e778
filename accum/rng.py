"""Random number generator state, captured and restored: the one place that knows which generators a
step draws from (torch's CPU generator, every CUDA device's, Python's `random`, NumPy's).

The planner restores it after probing (bit-identical training afterwards); checkpoints save its
tensor part (`tensors`) in safetensors, so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch


def capture(python: bool = True) -> dict[str, Any]:
    """The generators' state: "torch" and "cuda<i>" as tensors, "python" and "numpy" (with `python`)
    as their own objects."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{index}"] = cuda_state
    if python:
        state["python"] = random.getstate()
        with contextlib.suppress(ImportError):
            import numpy

            state["numpy"] = numpy.random.get_state()
    return state


def tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The part of a state that safetensors can hold (torch's and CUDA's generators)."""
    return {key: value for key, value in state.items() if torch.is_tensor(value)}


def restore(state: dict[str, Any]) -> None:
    """Set every generator named in `state` (a CUDA state is set only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    cuda_states = [state[key] for key in sorted((k for k in state if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
