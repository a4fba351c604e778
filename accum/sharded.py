"""What accumulation needs to know about sharded engines (FSDP2, DeepSpeed), in one place.

Both ways to run FSDP2 call these functions: Accelerate's FSDP plugin (`distributed_type: FSDP`,
`fsdp_version: 2`, GPUs only in Accelerate 1.15) and `torch.distributed.fsdp.fully_shard` applied by
hand (`fully_shard_model`; what the CPU tests run on gloo, where Accelerate does not enable FSDP). A
model is sharded when it *is* an `FSDPModule` (fully_shard swaps the class in place; Accelerate's
plugin does the same), whichever way it got there.

Under FSDP2 a rank's parameters and gradients are DTensors holding its shard. Accumulation then
differs from DDP in four ways, each answered here:
- sync: `set_requires_gradient_sync(False)` keeps the window's gradients unsharded and local, and the
  last micro-batch's backward (sync on) reduce-scatters their sum once, averaged over ranks as DDP's
  all-reduce is (`gradient_sync`);
- every rank must run every forward: the forward all-gathers each layer's weights, so a rank that
  skipped an empty micro-batch would leave the others waiting (the Accumulator runs it at zero weight);
- the gradient norm is a norm over shards: the sum of every rank's squares (`clip_grad_norm`);
- a checkpoint holds full tensors gathered from the shards, so that it loads on any number of ranks,
  or in a plain model (`full_state_dict`, `load_full_state_dict`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from accum.errors import ConfigError

__all__ = ["clip_grad_norm", "engine_of", "full_state_dict", "fully_shard_model", "gradient_sync",
           "is_fully_sharded", "load_full_state_dict", "local_shard", "oom_recovery_unavailable",
           "refuse_oom_recovery"]


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is an FSDP2 module (`fully_shard` applied to it, by hand or by Accelerate)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FSDPModule)


def engine_of(accelerator: Any, model: torch.nn.Module) -> str | None:
    """'FSDP' or 'DeepSpeed' when the model's gradients are sharded by an engine, else None (one
    process, DDP)."""
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", "")).upper()
    if is_fully_sharded(model) or kind == "FSDP":
        return "FSDP"
    return "DeepSpeed" if kind == "DEEPSPEED" else None


def oom_recovery_unavailable(engine: str | None, num_processes: int) -> str | None:
    """Why OOM recovery cannot work under `engine` ('FSDP', 'DeepSpeed', None) with `num_processes`
    ranks, in one clause; None where it works (one process, DDP, FSDP on one process)."""
    if engine == "FSDP" and num_processes > 1:
        return ("OOM recovery does not work under FSDP on several ranks: an out-of-memory error on one rank "
                "leaves the others waiting in the weights' all-gather inside forward, which cannot be cancelled")
    if engine == "DeepSpeed":
        return ("OOM recovery does not work under DeepSpeed: a replay at a smaller micro-batch changes the "
                "window's micro-batch count, which the engine fixes at start (its gradient_accumulation_steps)")
    return None


def refuse_oom_recovery(engine: str | None, num_processes: int) -> None:
    """Raise ConfigError (one line: why, and the fix) where `oom_recovery_unavailable` says it cannot work."""
    why = oom_recovery_unavailable(engine, num_processes)
    if why is not None:
        raise ConfigError(f"{why}; turn it off (`recovery=False`, --oom-recovery false)")


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard under FSDP2; the tensor itself otherwise),
    detached."""
    return getattr(tensor, "_local_tensor", tensor).detach()


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Inside: whether this backward reduce-scatters the gradients (FSDP2); sync is on again after, as
    FSDP2 starts. Off on every micro-batch of a window but the last, which reduce-scatters the window's
    sum once. Does nothing for a model that is not sharded (DDP's no_sync is Accelerate's)."""
    if not is_fully_sharded(model):
        yield
        return
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(accelerator: Any, model: torch.nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients of `model` to `max_norm` (inf: measure only) and return their global 2-norm
    before clipping as a plain tensor on every rank (None where the engine does not say: DeepSpeed
    before its first step). Sharded gradients are measured over all shards (DTensor's norm, gathered),
    so every rank clips by the same factor; otherwise this is `accelerator.clip_grad_norm_`."""
    if not is_fully_sharded(model):
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return norm if norm is None or not hasattr(norm, "full_tensor") else norm.full_tensor()
    accelerator.unscale_gradients()  # fp16: the norm of the true gradients
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    # clip_grads_with_norm_ takes the DTensor norm (it multiplies DTensor gradients); the caller the full value
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def fully_shard_model(model: torch.nn.Module, block_types: tuple[type, ...] | None = None, **kwargs: Any) -> Any:
    """Apply `torch.distributed.fsdp.fully_shard` to every block of `model` and then to the model, as
    Accelerate's TRANSFORMER_BASED_WRAP does: the blocks are the modules whose class is named in the
    model's `_no_split_modules` (transformers models list their layer class there), or `block_types`.
    Needs an initialised default process group. Returns the model (sharded in place). Raises ConfigError
    when no block is found (sharding only the root would gather the whole model at once)."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and
              (isinstance(m, block_types) if block_types else type(m).__name__ in names)]
    if not blocks:
        raise ConfigError(f"no block of {type(model).__name__} to shard (no `_no_split_modules`): pass "
                          "`block_types`, the classes of its layers")
    for block in blocks:
        fully_shard(block, **kwargs)
    return fully_shard(model, **kwargs)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _several_ranks() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_state_dict(model: torch.nn.Module, optimizer: Any = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(model state, optimizer state) as full CPU tensors keyed by parameter name, from a sharded or a
    plain model: what a checkpoint saves so that it loads on any number of ranks. With several ranks
    every rank must call it (the shards are gathered); the main process (rank 0) gets the whole state,
    the others empty dicts (a full copy on every rank would cost every rank the model's memory)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    options = _options(cpu_offload=True)  # with full_state_dict: gathered to rank 0's CPU only
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_state, optimizer_state


def load_full_state_dict(model: torch.nn.Module, model_state: dict[str, torch.Tensor], optimizer: Any = None,
                         optimizer_state: dict | None = None) -> None:
    """Load what `full_state_dict` returned (saved on any number of ranks) into `model` and `optimizer`,
    sharded or plain. With several ranks every rank must call it; only the main process's state is read
    (the others may pass empty dicts) and each rank receives its shard from it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(broadcast_from_rank0=_several_ranks())
    # copies of the containers: loading with broadcast replaces their entries by this rank's shards,
    # and a caller's state (kept, or saved after) would then hold DTensors instead of full tensors
    set_model_state_dict(model, _containers_copied(model_state), options=options)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, _containers_copied(optimizer_state), options=options)


def _containers_copied(value: Any) -> Any:
    """`value` with every dict and list copied and every tensor shared."""
    if isinstance(value, dict):
        return {key: _containers_copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_containers_copied(item) for item in value]
    return value
