"""Find the largest micro-batch that fits, by running real steps: grow by doubling, then binary-search.

`find_max_micro_batch` is the pure search over a "does size n fit?" callable; `plan_for` builds that
callable for a model (forward, backward, optimizer step, under `no_sync` when DDP-wrapped), leaves
no trace of it (weights, optimizer state, gradients and RNG restored bit for bit) and turns the
result into a Plan. With several processes, every rank probes the same sizes and after each probe
the ranks agree on "did any rank fail" through one all-reduce, so they never diverge or hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from accum import rng
from accum.cache import PlanCache
from accum.errors import ConfigError, check_positive_int, first_line
from accum.oom import (
    device_memory_bytes,
    device_name,
    device_total_bytes,
    free_memory,
    is_oom,
    measured_peak,
    parse_memory,
    start_peak_measurement,
)
from accum.plan import Plan, per_process_limit, plan_batch
from accum.recovery import agree_max
from accum.signals import Stopped

logger = logging.getLogger(__name__)

OBJECTIVES = ("largest", "throughput")
# Without a limit the doubling stops here; no real step fits 65536 samples on today's devices.
UNBOUNDED_LIMIT = 1 << 16


class NothingFitsError(ConfigError):
    """Not even the smallest micro-batch fits the memory budget (a one-line message with the fix)."""


@dataclass(frozen=True)
class Probe:
    """One trial: `steps` training steps back to back at micro-batch `size`. `seconds` is the wall
    time of one step (the mean); `peak_bytes` the memory the budget is compared with (accum.oom:
    the allocator's reserved peak on CUDA, the resident set's growth over the memory held before
    the probe on CPU)."""

    size: int
    fit: bool
    seconds: float
    peak_bytes: int | None
    samples_per_s: float | None
    error: str | None = None
    steps: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeResult:
    """The search's outcome: `size` is the largest micro-batch that fits (samples per process);
    `fastest_size` the fitting size with the most samples/s seen; `probes` every trial in order."""

    size: int
    fastest_size: int
    probes: list[Probe] = field(default_factory=list)
    objective: str = "largest"
    budget_bytes: int | None = None

    @property
    def chosen_size(self) -> int:
        """The size the objective picks: the largest, or the fastest for 'throughput'."""
        return self.fastest_size if self.objective == "throughput" else self.size

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "fastest_size": self.fastest_size,
            "objective": self.objective,
            "budget_bytes": self.budget_bytes,
            "probes": [probe.as_dict() for probe in self.probes],
        }


def format_bytes(value: float | None) -> str:
    """'1.23 GiB' / '456.0 MiB'; '-' for None."""
    if value is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def memory_budget(
    max_memory: str | float | int | None, safety_margin: float, device: torch.device | str | None
) -> int | None:
    """The peak a probe may reach, in bytes: `max_memory` (bytes, '8GiB', or a fraction of device
    memory) less `safety_margin`. On CUDA it bounds the allocator's reserved peak; on CPU the growth
    of the process over what it held before the step (accum.oom.measured_peak). Default: half the
    available memory on CPU (probing must never meet the kernel's OOM killer), all of it on CUDA,
    none elsewhere. Raises ConfigError on bad values."""
    if not 0 <= safety_margin < 1:
        raise ConfigError(f"safety margin {safety_margin!r} must be in [0, 1): e.g. 0.1 keeps 10% free")
    kind = torch.device(device).type if device is not None else "cpu"
    if max_memory is None:
        available = device_memory_bytes(device)
        if kind == "cpu":
            budget = available * 0.5
        elif kind == "cuda":
            budget = float(available)
        else:
            return None
    else:
        value = parse_memory(max_memory)
        budget = value * device_memory_bytes(device) if value <= 1 else value
    return int(budget * (1 - safety_margin)) if budget > 0 else None


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def find_max_micro_batch(
    try_step: Callable[[int], Any],
    start: int = 1,
    limit: int | None = None,
    *,
    max_memory: str | float | int | None = None,
    safety_margin: float = 0.1,
    objective: str = "largest",
    device: torch.device | str | None = None,
    agree: Callable[[list[float]], list[float]] | None = None,
    retries: int = 0,
    steps: int = 1,
    reset: Callable[[], None] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> ProbeResult:
    """Search the largest n for which `try_step(n)` runs without an out-of-memory error and within
    the memory budget: double from `start` until the first failure or `limit`, then binary-search
    between the last fit and the first failure (halving first when `start` already fails).

    `try_step(n)` runs one real step at micro-batch n; an OOM (see `accum.oom.is_oom`) or a peak over
    the budget (`memory_budget`) is a failure, any other exception propagates unchanged.
    `agree(values) -> maxima over ranks` makes ranks agree after every probe, in one collective
    (`accum.recovery.agree_max`): [failed, seconds] -> any rank failed, the slowest rank's time. `retries` re-runs a failed size that many times before believing it
    (for allocators that fragment). `steps` is how many training steps `try_step` runs per call (for
    the time per step). `reset()` runs before each probe, before its memory baseline is read, so that
    every probe starts from what a run starts from (plan_for drops the optimizer state an earlier
    probe created: a run allocates it in its first step, and so must each probe). For objective 'throughput' each fitting size runs once more, warm, and that
    run is timed. `should_stop()` (local and cheap, e.g. whether this process got SIGTERM) is asked
    before each probe; with `agree` its answer joins the values the ranks agree on after each probe
    (a third value, [failed, seconds, stop]), so every rank stops after the same one.

    Returns a ProbeResult (sizes in samples per process). Raises ConfigError for start < 1, a limit
    below start or an unknown objective, NothingFitsError when size 1 does not fit, and
    accum.signals.Stopped when `should_stop()` said so (the search is abandoned, nothing returned).
    """
    check_positive_int("start", start)
    if limit is not None and limit < start:
        raise ConfigError(f"limit {limit} is below start {start}: lower start or raise the batch size")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
    if retries < 0:
        raise ConfigError(f"retries {retries!r} must be 0 or more")
    device = torch.device(device) if device is not None else torch.device("cpu")
    budget = memory_budget(max_memory, safety_margin, device)
    ceiling = limit if limit is not None else UNBOUNDED_LIMIT
    probes: list[Probe] = []

    def run_once(size: int) -> tuple[bool, float, int | None, str | None]:
        if reset is not None:
            reset()
        free_memory(full=False)
        baseline = start_peak_measurement(device)
        error = None
        began = time.perf_counter()
        try:
            try_step(size)
            _synchronize(device)
        except Exception as exc:  # noqa: BLE001 - only OOMs are swallowed, below
            if not is_oom(exc):
                raise
            error = f"out of memory: {first_line(exc, 160)}"
        seconds = (time.perf_counter() - began) / steps
        if error is not None:
            free_memory()  # outside the except block: the traceback no longer pins the step's tensors
        peak = measured_peak(device, baseline) or None
        if error is None and budget is not None and peak is not None and peak > budget:
            error = f"over budget: peak {format_bytes(peak)} > {format_bytes(budget)}"
        return error is None, seconds, peak, error

    def stop_requested() -> bool:
        return should_stop is not None and bool(should_stop())

    def probe(size: int) -> bool:
        for _attempt in range(retries + 1):
            if agree is None and stop_requested():
                raise Stopped(f"stopped before probing micro-batch {size}")
            fit, seconds, peak, error = run_once(size)
            if fit and objective == "throughput":
                fit, seconds, warm_peak, error = run_once(size)
                peak = max(peak or 0, warm_peak or 0) or None
            if agree is not None:
                values = [0.0 if fit else 1.0, seconds] + ([1.0 if stop_requested() else 0.0] if should_stop else [])
                failed_anywhere, seconds, *stop_anywhere = agree(values)
                if stop_anywhere and stop_anywhere[0] > 0:
                    raise Stopped(f"stopped after probing micro-batch {size}")
                if fit and failed_anywhere > 0:
                    error = "failed on another rank"
                fit = failed_anywhere == 0
            speed = size / seconds if fit and seconds > 0 else None
            record = Probe(size, fit, seconds, peak, speed, error, steps)
            probes.append(record)
            if progress:
                print(_probe_line(record), file=sys.stderr, flush=True)
            if fit:
                return True
        return False

    largest_fit, smallest_fail = 0, None
    size = min(start, ceiling)
    while True:  # grow by doubling
        if not probe(size):
            smallest_fail = size
            break
        largest_fit = size
        if size >= ceiling:
            break
        size = min(size * 2, ceiling)
    if largest_fit == 0:  # start already fails: halve until something fits
        size = start // 2
        while size >= 1:
            if probe(size):
                largest_fit = size
                break
            smallest_fail = size
            size //= 2
    if largest_fit == 0:
        last = probes[-1].error if probes else "no probe ran"
        raise NothingFitsError(
            f"micro-batch 1 does not fit ({last}): raise `max_memory`, shorten the sequence, "
            f"or turn on gradient checkpointing"
        )
    while smallest_fail is not None and smallest_fail - largest_fit > 1:  # binary search
        middle = (largest_fit + smallest_fail) // 2
        if probe(middle):
            largest_fit = middle
        else:
            smallest_fail = middle

    fastest = largest_fit
    timed = [p for p in probes if p.fit and p.samples_per_s is not None and p.size <= largest_fit]
    if timed:
        fastest = max(timed, key=lambda p: (p.samples_per_s, p.size)).size
    return ProbeResult(largest_fit, fastest, probes, objective, budget)


def _probe_line(probe: Probe) -> str:
    verdict = "fit" if probe.fit else "FAIL"
    speed = f"{probe.samples_per_s:9.1f} samples/s" if probe.samples_per_s else " " * 19
    note = f"  ({probe.error})" if probe.error else ""
    return f"probe {probe.size:6d}: {verdict:4s} {probe.seconds:7.2f} s {speed}  peak {format_bytes(probe.peak_bytes)}{note}"


def format_probe_table(probes: list[Probe] | list[Mapping[str, Any]]) -> str:
    """A table of probes for people: size, fit, seconds, samples/s, peak memory, why it failed."""
    rows = [f"{'size':>6}  {'fit':<4}  {'seconds':>8}  {'samples/s':>10}  {'peak memory':>12}  note"]
    for probe in probes:
        data = probe.as_dict() if isinstance(probe, Probe) else dict(probe)
        speed = f"{data['samples_per_s']:.1f}" if data.get("samples_per_s") else "-"
        rows.append(
            f"{data['size']:>6}  {'yes' if data['fit'] else 'no':<4}  {data['seconds']:>8.3f}  {speed:>10}  "
            f"{format_bytes(data.get('peak_bytes')):>12}  {data.get('error') or ''}".rstrip()
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------- the model's step


def _distributed_world() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank_agreement(device: torch.device | str) -> Callable[[list[float]], list[float]] | None:
    """`agree` for find_max_micro_batch over the default process group (maxima over ranks, one
    all-reduce per probe); None with a single process."""
    if _distributed_world() <= 1:
        return None
    return lambda values: agree_max(values, device)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def _cpu_copy(value: Any) -> Any:
    """A deep copy with every tensor cloned to CPU (snapshots must not cost device memory)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


def _tensor_bytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


@dataclass
class _Snapshot:
    """Everything a probe changes: weights and buffers, gradients, optimizer state, RNG, train mode."""

    weights: dict[str, torch.Tensor]
    grads: list[torch.Tensor | None]
    optimizer_state: dict[str, Any] | None
    rng: dict[str, Any]
    training: bool

    @classmethod
    def take(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> _Snapshot:
        return cls(
            weights=_cpu_copy(model.state_dict()),
            grads=[_cpu_copy(p.grad) if p.grad is not None else None for p in model.parameters()],
            optimizer_state=_cpu_copy(optimizer.state_dict()) if optimizer is not None else None,
            rng=rng.capture(),
            training=model.training,
        )

    def nbytes(self) -> int:
        return _tensor_bytes(self.weights) + _tensor_bytes(self.grads) + _tensor_bytes(self.optimizer_state)

    def start_over(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Before a probe: no gradients, and the optimizer state as it was (usually none yet), so the
        probe allocates what a run's first steps allocate."""
        model.zero_grad(set_to_none=True)
        if optimizer is not None and self.optimizer_state is not None:
            optimizer.zero_grad(set_to_none=True)
            # a copy: load_state_dict keeps tensors that are already on the right device, and the
            # probe's optimizer steps would then change the snapshot in place
            optimizer.load_state_dict(_cpu_copy(self.optimizer_state))

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(self.weights[name])  # in place: the optimizer keeps the same parameters
        for param, grad in zip(model.parameters(), self.grads, strict=True):
            param.grad = grad.to(param.device, copy=True) if grad is not None else None
        if optimizer is not None and self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        rng.restore(self.rng)
        model.train(self.training)


def _warm_up(step: Callable[[int], Any]) -> None:
    """One unmeasured step at micro-batch 1: what a process allocates once, whatever the batch (kernel
    and autograd caches, threads' buffers; 15 MiB measured with a tiny BERT), is then held before the
    first probe as before a run's later steps, and no probe is charged for it. An OOM here is left to
    the search to report."""
    try:
        step(1)
    except Exception as exc:  # noqa: BLE001 - only OOMs are left to the search
        if not is_oom(exc):
            raise
    free_memory()


@contextlib.contextmanager
def _leave_no_trace(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[_Snapshot]:
    snapshot = _Snapshot.take(model, optimizer)
    model.zero_grad(set_to_none=True)
    try:
        yield snapshot
    finally:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        free_memory()
        snapshot.restore(model, optimizer)
        free_memory()


def _model_device(model: torch.nn.Module, accelerator: Any) -> torch.device:
    if accelerator is not None:
        return torch.device(accelerator.device)
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _no_sync(model: torch.nn.Module, accelerator: Any) -> contextlib.AbstractContextManager:
    """No gradient all-reduce during a probe: a rank that fails inside it would leave the others waiting."""
    if accelerator is not None:
        return accelerator.no_sync(model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    # AcceleratedOptimizer skips step() while accumulating; the probe wants the real step.
    return getattr(optimizer, "optimizer", optimizer)


def make_train_step(
    model: torch.nn.Module,
    make_batch: Callable[[int], Mapping[str, Any]],
    accelerator: Any = None,
    optimizer: Any = None,
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
    steps: int = 1,
) -> Callable[[int], None]:
    """try_step(n) for the planner: `steps` training steps at micro-batch n, back to back (forward
    on make_batch(n), backward under no_sync, a real optimizer step and zero_grad; nothing freed in
    between), so activations, gradients, optimizer state and what the allocator keeps between
    steps are all counted, as in a run."""
    device = _model_device(model, accelerator)
    raw_optimizer = _raw_optimizer(optimizer)

    def try_step(size: int) -> None:
        for _ in range(steps):
            one_step(size)

    def one_step(size: int) -> None:
        model.train()
        batch = _to_device(make_batch(size), device)
        # the run's autocast: a model not yet prepared would otherwise be probed in full precision
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        with _no_sync(model, accelerator), autocast:
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
        del loss, batch
        if raw_optimizer is not None:
            raw_optimizer.step()
            raw_optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return try_step


def make_eval_step(
    model: torch.nn.Module, make_batch: Callable[[int], Mapping[str, Any]], accelerator: Any = None
) -> Callable[[int], None]:
    """try_step(n) for an evaluation batch: forward only, under torch.no_grad, in eval mode."""
    device = _model_device(model, accelerator)

    def try_step(size: int) -> None:
        model.eval()
        batch = _to_device(make_batch(size), device)
        with torch.no_grad():
            output = model(**batch)
        del output, batch

    return try_step


def _model_id(model: torch.nn.Module) -> str:
    """A name plus a hash of the architecture and head: the HF config (and the model class, which
    says the task) when there is one, else parameter shapes."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile's wrapper
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        text = type(inner).__name__ + config.to_json_string(use_diff=False)
        name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(inner).__name__
    else:
        text = json.dumps([[n, list(p.shape), str(p.dtype)] for n, p in inner.named_parameters()])
        name = type(inner).__name__
    return f"{name}#{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _versions() -> dict[str, str | None]:
    import accum

    transformers = sys.modules.get("transformers")
    return {"torch": torch.__version__, "transformers": getattr(transformers, "__version__", None),
            "accum": accum.__version__}


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers renamed the attribute in 5.x)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False


def plan_cache_fields(model: torch.nn.Module, accelerator: Any, optimizer: Any, batch_shape: dict[str, Any], *,
                      processes: int, limit: int, max_memory: str | float | int | None, safety_margin: float,
                      objective: str, steps: int, loss_fn: Any = None, cut: str = "samples") -> dict[str, Any]:
    """Everything a probed plan depends on, for `PlanCache.key_for`: the model (architecture and
    head, so the task), attention implementation, gradient checkpointing, compilation, precision,
    optimizer, loss, objective, engine, device and its total memory, processes, the memory budget
    and margin, the batch's per-sample shape (sequence length), the probe's steps and the versions
    of torch, transformers and accum. A plan cached under one budget is never used under another. The
    budget enters in bytes when given in bytes, else as given (a share of what is available now
    changes from run to run; the device's total memory is a field of its own)."""
    inner = getattr(model, "module", model)
    base = getattr(inner, "_orig_mod", inner)
    config = getattr(base, "config", None)
    device = torch.device(accelerator.device)
    dtypes = sorted({str(p.dtype) for p in base.parameters()})
    budget = max_memory
    if max_memory is not None and parse_memory(max_memory) > 1:
        budget = int(parse_memory(max_memory))
    return {
        "model": _model_id(model),
        "attention": getattr(config, "_attn_implementation", None),
        "gradient_checkpointing": _checkpointing(base),
        "compiled": hasattr(model, "_orig_mod") or hasattr(inner, "_orig_mod"),
        "precision": f"{getattr(accelerator, 'mixed_precision', 'no')}/{','.join(dtypes)}",
        "optimizer": _optimizer_id(optimizer),
        # sparse tables skip a dense gradient of the table per micro-batch (accum.embeddings): less memory
        "sparse_embeddings": [name for name, m in base.named_modules() if isinstance(m, torch.nn.Embedding) and m.sparse],
        "loss": getattr(loss_fn, "__qualname__", None),
        "objective": objective,
        "engine": str(getattr(accelerator, "distributed_type", "NO")),
        "device": device_name(device),
        "device_memory": device_total_bytes(device),
        "processes": processes,
        "limit": limit,
        "budget": budget,
        "safety_margin": safety_margin,
        "batch": batch_shape,
        "steps_per_probe": steps,
        "cut": cut,
        **_versions(),
    }


def _optimizer_id(optimizer: Any) -> str | None:
    """The optimizer's class and the kernel it steps with: fused and foreach steps hold other temporaries
    than the per-tensor loop (MiniLM's default plan: 13 samples fit with AdamW's loop, 17 fused)."""
    raw = _raw_optimizer(optimizer) if optimizer is not None else None
    if raw is None:
        return None
    kernel = [f"{name}={raw.defaults[name]}" for name in ("foreach", "fused") if raw.defaults.get(name) is not None]
    return type(raw).__name__ + (f"({', '.join(kernel)})" if kernel else "")


def _batch_shape(make_batch: Callable[[int], Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Per-sample shapes and dtypes of the batch; make_batch's draw from the RNG is undone."""
    before = rng.capture()
    try:
        batch = make_batch(1)
    finally:
        rng.restore(before)
    return {key: [list(value.shape[1:]), str(value.dtype)] for key, value in batch.items() if torch.is_tensor(value)}



def from_main_process(value: Any) -> Any:
    """`value` as the main process (global rank 0) has it, on every rank (one broadcast of a pickled
    object; the value itself with a single process). Every rank must call it, at the same point."""
    if _distributed_world() <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _cached_plan(cache: PlanCache, cache_key: str, target_batch_size: int, processes: int) -> Plan | None:
    """The cache's plan for `cache_key` (source 'cache', no probes), or None: none, invalid, or for
    another batch or process count."""
    cached = cache.get(cache_key)
    if cached is None:
        return None
    try:
        plan = Plan.from_dict(cached)
    except ConfigError as exc:
        logger.warning("plan cache %s: the entry for this run is invalid (%s): probing again; "
                       "`replan` rewrites it", cache.path, exc)
        return None
    if plan.target_batch_size != target_batch_size or plan.num_processes != processes:
        return None
    return Plan(**{**plan.to_dict(), "source": "cache", "probes": (), "cache_key": cache_key})

def plan_for(
    accelerator: Any,
    model: torch.nn.Module,
    make_batch: Callable[[int], Mapping[str, Any]],
    target_batch_size: int,
    optimizer: Any = None,
    *,
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
    max_memory: str | float | int | None = None,
    safety_margin: float = 0.1,
    objective: str = "largest",
    start: int = 1,
    cache_path: str | Any = None,
    replan: bool = False,
    allow_rounding: bool = False,
    progress: bool = True,
    retries: int = 0,
    num_processes: int | None = None,
    steps_per_probe: int = 2,
    cut: str = "samples",
    sequence_length: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Plan:
    """Probe `model` with real training steps on `accelerator`'s device and return the Plan that
    reaches `target_batch_size` exactly, over `accelerator.num_processes` processes, with the largest
    (or, for objective 'throughput', the fastest) micro-batch that fits.

    `accelerator`: the run's Accelerator (None: a default one is created), so that the device and the
    number of processes are the run's. The model is moved to its device first (in place, as
    `model.to` does) and probed under its autocast. Call it before `accelerator.prepare`, or after:
    both work. `make_batch(n)` returns a dict of tensors for n samples of the longest length training
    will meet (moved to the device here); the loss is `loss_fn(model, batch)` or `model(**batch).loss`.
    Each probe runs `steps_per_probe` training steps back to back (forward, backward, optimizer step,
    no cache emptied between them), so optimizer state and the allocator's fragmentation count as in
    a run. No micro-batch above target / processes is probed. Weights, optimizer state, gradients and
    RNG state are restored bit for bit. The plan cache (`cache_path`; None: the default file, False:
    no cache) is read first unless `replan`, under the key of every input the answer depends on
    (`plan_cache_fields`), and written after probing; the Plan carries that key (`cache_key`) for a
    caller that later adjusts it. With several processes the main process decides: it reads its cache
    and broadcasts the hit (or the miss) before any probe, so either every rank probes together or
    none does, and every rank returns the main process's Plan (`from_main_process`); only the main
    process reads and writes the cache (on several nodes, the cache of the node with rank 0).
    `num_processes` plans for another launch than this one (`python -m accum plan --num-processes`);
    by default the accelerator's. `cut` says how the target
    is split (accum.plan.plan_batch: "samples", "balanced", or "tokens" with `sequence_length`, the
    tokens per sample `make_batch` builds: the plan's token budget is the largest fit x that length).

    `should_stop()` is asked before the warm-up step and each probe (`find_max_micro_batch`): a
    SIGTERM during planning stops it after the probe in flight, with everything restored and nothing cached.

    Returns a Plan (source 'probe' or 'cache'). Raises ConfigError for bad sizes, objective or
    budget, NothingFitsError when micro-batch 1 does not fit, accum.signals.Stopped when
    `should_stop()` said so.
    """
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    model.to(accelerator.device)
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
    processes = int(num_processes if num_processes is not None else accelerator.num_processes)
    limit = per_process_limit(target_batch_size, processes, allow_rounding)
    if start > limit:
        raise ConfigError(
            f"start {start} is above the per-process batch {limit} (batch size {target_batch_size} over "
            f"{processes} processes): lower start or raise the batch size"
        )
    device = _model_device(model, accelerator)
    budget = memory_budget(max_memory, safety_margin, device)  # validates before any probing
    check_positive_int("steps_per_probe", steps_per_probe)
    cache = PlanCache(cache_path) if cache_path is not False else None
    cache_key = None
    if cache is not None:
        cache_key = PlanCache.key_for(plan_cache_fields(
            model, accelerator, optimizer, _batch_shape(make_batch), processes=processes, limit=limit,
            max_memory=max_memory, safety_margin=safety_margin, objective=objective, steps=steps_per_probe,
            loss_fn=loss_fn, cut=cut))
    if cache is not None and not replan:
        # the main process alone decides: ranks whose caches differ (another node, another GPU model)
        # would otherwise split, some returning a hit while the others wait in the probe's collectives
        hit = _cached_plan(cache, cache_key, target_batch_size, processes) if accelerator.is_main_process else None
        hit = from_main_process(hit)
        if hit is not None:
            logger.info("plan from cache %s: %s", cache.path, hit.banner())
            return hit

    raw_optimizer = _raw_optimizer(optimizer)
    is_main = accelerator is None or accelerator.is_main_process
    with _leave_no_trace(model, raw_optimizer) as snapshot:
        step = make_train_step(model, make_batch, accelerator, optimizer, loss_fn, steps=steps_per_probe)
        if rank_agreement(device) is None and should_stop is not None and should_stop():
            raise Stopped("stopped before the warm-up step")
        _warm_up(step)
        result = find_max_micro_batch(
            step,
            start,
            limit,
            max_memory=budget / (1 - safety_margin) if budget is not None else None,
            safety_margin=safety_margin,
            objective=objective,
            device=device,
            agree=rank_agreement(device),
            retries=retries,
            steps=steps_per_probe,
            reset=lambda: snapshot.start_over(model, raw_optimizer),
            progress=progress and is_main,
            should_stop=should_stop,
        )
    plan = plan_batch(
        target_batch_size,
        result.chosen_size,
        processes,
        allow_rounding=allow_rounding,
        source="probe",
        probes=[probe.as_dict() for probe in result.probes],
        cut=cut,
        token_length=sequence_length if cut == "tokens" else None,
    )
    # every rank takes the main process's plan: the verdicts agree, but each rank measured its own
    # peaks and times, and a run needs one Plan object, the same everywhere
    plan = from_main_process(dataclasses.replace(plan, cache_key=cache_key))
    if cache is not None and is_main:
        cache.put(cache_key, plan.to_dict())
    return plan


def plan_eval_batch(
    model: torch.nn.Module,
    make_batch: Callable[[int], Mapping[str, Any]],
    accelerator: Any = None,
    *,
    limit: int | None = None,
    max_memory: str | float | int | None = None,
    safety_margin: float = 0.1,
    start: int = 1,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> ProbeResult:
    """The largest evaluation batch per process (forward only, no_grad, eval mode) that fits, up to
    `limit`. Leaves the model, its mode and the RNG as they were. Returns a ProbeResult; raises as
    `find_max_micro_batch` does."""
    device = _model_device(model, accelerator)
    is_main = accelerator is None or accelerator.is_main_process
    with _leave_no_trace(model, None):
        return find_max_micro_batch(
            make_eval_step(model, make_batch, accelerator),
            start,
            limit,
            max_memory=max_memory,
            safety_margin=safety_margin,
            device=device,
            agree=rank_agreement(device),
            progress=progress and is_main,
            should_stop=should_stop,
        )
