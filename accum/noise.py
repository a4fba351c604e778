"""Gradient noise scale and the critical batch size, from gradients accumulation already makes.

McCandlish et al., "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), appendix A.1:
the mean gradient of a batch of B items drawn i.i.d. satisfies

    E[|G_B|^2] = |G|^2 + tr(Sigma) / B

so two batch sizes B_small < B_big give unbiased estimates of |G|^2 (the true gradient's squared
norm) and tr(Sigma) (the per-item gradient covariance), and B_simple = tr(Sigma) / |G|^2 estimates
the critical batch size: past it, a bigger batch buys little per extra item.

Accumulation already holds both sizes, so measuring costs no extra forward or backward pass:

- one process, accumulation N >= 2: each micro-batch is a small batch (`MicroGradientNorms`),
  the window is the big batch;
- P >= 2 processes (DDP): each rank's local window gradient is a small batch, the all-reduced
  gradient the big one (`LocalGradientNormHook`, a DDP communication hook);
- one process, accumulation 1: nothing smaller to compare with (`describe_unavailable`).

Batch sizes are in *items*: whatever the loss is normalised by (samples, or tokens that count in
the loss). With token normalisation B_simple is in tokens; tokens of one sequence are correlated, so
read it as an effective number of tokens and convert with tokens per sample before planning.

Scaling the caller passes (`grad_scale`): the constant c such that, on this rank, the accumulated
``.grad`` equals c x (sum over the items seen so far of each item's gradient). With accum's exact
normalisation (docs/architecture.md: backward of sum_of_item_losses * N * P / total_items_in_window, which
Accelerate divides by N) that is

    grad_scale = num_processes / total_items_in_window          (x the loss scale under fp16,
                                                                   when read before unscaling)

and a micro-batch's own mean gradient is its contribution x total_items / (num_processes x its_items).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "LocalGradientNormHook",
    "MicroGradientNorms",
    "NoiseScaleTracker",
    "describe_unavailable",
    "estimate_noise",
    "grad_sq_norm",
    "measurement_method",
    "recommend_batch",
]


def estimate_noise(g_small_sq: float, b_small: float, g_big_sq: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates of (|G|^2, tr(Sigma)) from squared gradient norms at two batch sizes.

    g_small_sq: mean over the small batches of |mean gradient of a small batch|^2; b_small its batch
    size in items (the harmonic mean when the small batches differ in size). g_big_sq, b_big: the same
    for the big batch. Returns (g_sq, trace_sigma); either may come out negative from noise alone, which
    is why `NoiseScaleTracker` smooths them before taking their ratio.
    Raises ValueError when a size is not positive, b_small >= b_big, or a norm is negative or not finite.
    """
    for name, value in (("g_small_sq", g_small_sq), ("g_big_sq", g_big_sq)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r}: a squared norm must be finite and >= 0")
    if not (math.isfinite(b_small) and math.isfinite(b_big)) or b_small <= 0:
        raise ValueError(f"b_small={b_small!r}, b_big={b_big!r}: batch sizes must be finite and > 0")
    if b_small >= b_big:
        raise ValueError(
            f"b_small={b_small!r} >= b_big={b_big!r}: the small batch must be smaller than the big one"
        )
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, trace_sigma


class NoiseScaleTracker:
    """Exponential moving averages of |G|^2 and tr(Sigma) over optimizer steps, and their ratio.

    The two estimates are smoothed separately and B_simple is the ratio of the averages (not an
    average of ratios, which a near-zero |G|^2 estimate would wreck), as the paper recommends.
    Averages are bias-corrected (Adam-style); the correction cancels in the ratio.
    """

    def __init__(self, beta: float = 0.99, min_updates: int = 10):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta!r}: must be in [0, 1)")
        if min_updates < 1:
            raise ValueError(f"min_updates={min_updates!r}: must be >= 1")
        self.beta = float(beta)
        self.min_updates = int(min_updates)
        self.reset()

    def reset(self) -> None:
        self.updates = 0
        self.skipped = 0
        self._g_sq_ema = 0.0
        self._trace_ema = 0.0
        self.last_g_sq: float | None = None
        self.last_trace_sigma: float | None = None

    def update(self, g_small_sq: float, b_small: float, g_big_sq: float, b_big: float) -> float | None:
        """Fold one optimizer step's measurement in; return the current B_simple (or None).

        A non-finite norm (an fp16 overflow step) is counted in `skipped` and ignored.
        Raises ValueError for bad batch sizes (see `estimate_noise`).
        """
        if not (math.isfinite(g_small_sq) and math.isfinite(g_big_sq)):
            self.skipped += 1
            return self.b_simple
        g_sq, trace_sigma = estimate_noise(g_small_sq, b_small, g_big_sq, b_big)
        self._g_sq_ema = self.beta * self._g_sq_ema + (1.0 - self.beta) * g_sq
        self._trace_ema = self.beta * self._trace_ema + (1.0 - self.beta) * trace_sigma
        self.updates += 1
        self.last_g_sq, self.last_trace_sigma = g_sq, trace_sigma
        return self.b_simple

    def _corrected(self, ema: float) -> float | None:
        if self.updates == 0:
            return None
        return ema / (1.0 - self.beta**self.updates)

    @property
    def g_sq(self) -> float | None:
        """Bias-corrected EMA of the |G|^2 estimates; None before the first update."""
        return self._corrected(self._g_sq_ema)

    @property
    def trace_sigma(self) -> float | None:
        """Bias-corrected EMA of the tr(Sigma) estimates; None before the first update."""
        return self._corrected(self._trace_ema)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2 in items; None before `min_updates` updates or while either EMA is <= 0."""
        if self.updates < self.min_updates:
            return None
        g_sq, trace = self.g_sq, self.trace_sigma
        if g_sq is None or trace is None or g_sq <= 0 or trace <= 0:
            return None
        return trace / g_sq

    def as_dict(self) -> dict[str, Any]:
        """Scalars for a log line, a tracker and metrics.json (None where not yet known)."""
        return {
            "noise_b_simple": self.b_simple,
            "noise_g_sq": self.g_sq,
            "noise_trace_sigma": self.trace_sigma,
            "noise_updates": self.updates,
            "noise_skipped": self.skipped,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state, for checkpoints."""
        return {
            "beta": self.beta,
            "min_updates": self.min_updates,
            "updates": self.updates,
            "skipped": self.skipped,
            "g_sq_ema": self._g_sq_ema,
            "trace_ema": self._trace_ema,
            "last_g_sq": self.last_g_sq,
            "last_trace_sigma": self.last_trace_sigma,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.min_updates = int(state["min_updates"])
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        self._g_sq_ema = float(state["g_sq_ema"])
        self._trace_ema = float(state["trace_ema"])
        self.last_g_sq = state.get("last_g_sq")
        self.last_trace_sigma = state.get("last_trace_sigma")


# -- measuring in a training loop ------------------------------------------------------------------


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32, or the gradient's own dtype when it is wider (fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm as a 0-d tensor in at least fp32, with no host sync."""
    return _norm(t.detach()).square()


def _norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm as a 0-d tensor in at least fp32 (no host sync). An fp32 or fp64 tensor is normed in its
    own dtype: asking for dtype=fp32 of an fp32 tensor takes a slower casting path on the CPU (about
    15% slower here), for the same fp32 accumulation."""
    if t.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(t, 2)
    return torch.linalg.vector_norm(t, 2, dtype=_wide(t.dtype))


def _fused_sq_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared L2 norms of `tensors` in at least fp32, one fused multi-tensor call (no host sync)."""
    if all(t.dtype in (torch.float32, torch.float64) for t in tensors):  # as in _norm: no casting path
        return torch.stack(torch._foreach_norm(tensors, 2)).square().sum()  # (stack promotes fp32 + fp64)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=_wide(tensors[0].dtype))).square().sum()


def _sq_norm_tensor(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """Sum of squares in fp32 as a 0-d tensor (no host sync), or None when there is nothing."""
    total: torch.Tensor | None = None
    for t in tensors:
        if t is None:
            continue
        sq = _sq(t)
        total = sq if total is None else total + sq.to(total.device)
    return total


def grad_sq_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """Sum over parameters of the squared L2 norm of `.grad`, computed in fp32 (0.0 when no grads).

    Read it before clipping and, under fp16, divide by the loss scale squared if read before unscaling.
    """
    total = _sq_norm_tensor(p.grad for p in parameters)
    return 0.0 if total is None else float(total)


def measurement_method(num_processes: int, accumulation_steps: int) -> str | None:
    """Where the small batch comes from: "ranks" (P >= 2: local vs all-reduced gradient),
    "micro_batches" (one process, accumulation >= 2), or None (nothing smaller than the window)."""
    if num_processes < 1 or accumulation_steps < 1:
        raise ValueError(
            f"num_processes={num_processes!r}, accumulation_steps={accumulation_steps!r}: both must be >= 1"
        )
    if num_processes >= 2:
        return "ranks"
    if accumulation_steps >= 2:
        return "micro_batches"
    return None


def describe_unavailable(num_processes: int, accumulation_steps: int) -> str | None:
    """The one line to print when the noise scale cannot be measured, else None."""
    if measurement_method(num_processes, accumulation_steps) is not None:
        return None
    return (
        "noise scale: not measured: one process with accumulation 1 has no smaller batch to compare "
        "with the optimizer step's; use `grad_accum_steps` 2 or more, or 2 or more processes"
    )


class MicroGradientNorms:
    """Small-batch squared norms from the micro-batches of one window, on one process.

    After micro-batch k's backward, `.grad` holds A_k = grad_scale x (sum of item gradients of
    micro-batches 1..k). Two ways to read small batches out of it, both unbiased:

    - keep_previous=True (default): micro-batch k's own gradient g_k, normed parameter by parameter
      as autograd hands it over (a gradient hook, before it is added to `.grad`), then let go, so
      peak memory does not grow by a gradient set (reading g_1 from `.grad` after the first backward
      instead, in one fused pass, measured no faster: the norms are bound by memory bandwidth, and
      a sparse embedding table's hook reads only its touched rows). N independent small batches per
      window: the lower-variance choice. The big batch is the window's `.grad`:
      one fused pass, or none where the loop hands over clipping's norm (`window_result(big_sq)`).
      On a CPU, 2.0-2.35% of a MiniLM micro-step of 8 x 64 tokens with sparse embedding gradients
      (`make bench`): one read of the dense gradients, bound by memory bandwidth.
    - keep_previous=False: the prefix A_k (k < N) is itself the mean gradient of the first k
      micro-batches' items; no hooks, one pass over `.grad` per micro-batch, noisier.

    Use with one process (or rank-locally, before any all-reduce: DDP's sync backward overwrites
    `.grad` with the average, so on several ranks use `LocalGradientNormHook` instead)::

        norms = MicroGradientNorms(model.parameters())
        norms.start_window(grad_scale=num_processes / total_items_in_window)
        for batch in window:
            accelerator.backward(loss_of(batch))
            norms.after_backward(items=items_in(batch))
        measured = norms.window_result()   # before clipping; None for a 1-micro-batch window
        if measured is not None:
            tracker.update(*measured)

    The window must start with zero (or None) gradients. A parameter autograd reaches twice in one
    backward (re-entrant activation checkpointing) has its parts summed before the norm; the first
    window that shows one is not measured (`window_result` returns None: its first part was not
    kept), later windows keep that parameter's parts. `close()` removes the hooks.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], keep_previous: bool = True):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.keep_previous = keep_previous
        self._reached_twice: set[int] = set()  # parameters whose parts this meter keeps until the norm
        self._handles = []
        if keep_previous:
            meter = weakref.ref(self)  # the model's hooks must not keep a dropped meter alive
            self._handles = [p.register_hook(functools.partial(_record_incoming, meter, index))
                             for index, p in enumerate(self.parameters)]
        self.start_window(1.0)
        self._armed = False  # hooks record only between start_window and window_result

    def close(self) -> None:
        """Remove the gradient hooks (the meter then measures nothing more)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._armed = [], False

    def start_window(self, grad_scale: float) -> None:
        """Call before the window's first backward (gradients zero); grad_scale as in the module doc."""
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale={grad_scale!r}: must be finite and > 0")
        self.grad_scale = float(grad_scale)
        self._items: list[float] = []
        self._small_sq: list[torch.Tensor] = []  # unscaled ||.||^2 of each small batch's gradient sum
        self._last_sq: torch.Tensor | None = None  # ||A_k||^2 of the latest prefix
        self._norms: dict[int, torch.Tensor] = {}  # this micro-batch's gradient norm per parameter index
        self._parts: dict[int, torch.Tensor] = {}  # this micro-batch's gradient so far, of a parameter reached twice
        self._missed = False  # a parameter reached twice whose first part was not kept: this window is inexact
        self._armed = self.keep_previous

    def _record(self, index: int, grad: torch.Tensor) -> None:
        """A hook's call: this micro-batch's gradient of parameter `index`, normed at once (no host sync)."""
        if not self._armed:
            return
        grad = grad.detach()
        if index in self._norms:  # a second part in this backward
            earlier = self._parts.get(index)
            if earlier is None:
                self._reached_twice.add(index)
                self._missed = True
                return
            grad = earlier + grad
        if index in self._reached_twice:
            self._parts[index] = grad
        # The norm, not its square: one kernel per parameter; after_backward squares them all at once.
        self._norms[index] = _norm(_values(grad))

    def after_backward(self, items: float) -> None:
        """Record micro-batch k's gradient, `items` (samples or tokens) being the items it carried."""
        if items <= 0:
            raise ValueError(f"items={items!r}: a micro-batch must carry at least one item")
        if self.keep_previous:
            norms = list(self._norms.values())
            self._norms.clear()
            self._parts.clear()
            self._small_sq.append(_stacked_sq_sum(norms))
        else:
            if self._last_sq is not None:
                self._small_sq.append(self._last_sq)
            live = [p.grad.detach() for p in self.parameters if p.grad is not None]
            self._last_sq = _fused_sq_sum(live) if live else torch.zeros((), dtype=torch.float32)
        self._items.append(float(items))

    def window_result(self, big_sq: torch.Tensor | float | None = None) -> tuple[float, float, float, float] | None:
        """(g_small_sq, b_small, g_big_sq, b_big) of the window so far, ready for
        `NoiseScaleTracker.update`; None when it had fewer than two micro-batches, or a parameter was
        first seen reached twice in it. One host sync.

        big_sq: the squared norm of `.grad` as the window left it (in `.grad`'s units: under fp16 with
        the loss scale in it), where the loop has it already: gradient clipping computes the window's
        norm anyway (`clip_grad_norm_` returns it: squared; not under a loss scaler, see
        `clip_norm_serves_noise`). Then the meter makes no pass over `.grad` of its own; without it,
        one fused pass."""
        self._armed = False
        self._norms.clear()
        self._parts.clear()
        if len(self._items) < 2 or self._missed:
            return None
        c = self.grad_scale
        total_items = sum(self._items)
        if self.keep_previous:
            sizes = self._items
            if big_sq is None:
                grads = [p.grad.detach() for p in self.parameters if p.grad is not None]
                big_sq = _fused_sq_sum(grads) if grads else None
        else:
            sizes = list(_cumsum(self._items))[:-1]
            big_sq = self._last_sq
        # mean gradient of a batch of n items = (its share of .grad) / (c n)
        device = self._small_sq[0].device
        # fp64 for a few numbers costs nothing and keeps an fp64 norm exact (MPS has no fp64)
        wide = torch.float32 if device.type == "mps" else torch.float64
        if big_sq is None:
            big = torch.zeros((), device=device)
        else:
            big = big_sq if torch.is_tensor(big_sq) else torch.tensor(float(big_sq), dtype=wide)
        *smalls, big_value = torch.stack([t.to(device, wide) for t in (*self._small_sq, big)]).tolist()  # one transfer
        g_small_sq = sum(s / (c * n) ** 2 for s, n in zip(smalls, sizes, strict=True)) / len(sizes)
        b_small = len(sizes) / sum(1.0 / n for n in sizes)  # E mean_k |g_k|^2 = |G|^2 + S mean_k(1/n_k)
        g_big_sq = big_value / (c * total_items) ** 2
        return g_small_sq, b_small, g_big_sq, total_items


def _values(grad: torch.Tensor) -> torch.Tensor:
    """The values whose norm is the gradient's: a sparse gradient (an embedding's rows, one entry per
    token, accum.embeddings) is coalesced first, so a row that several tokens touched is summed before
    it is squared; only its touched rows are read, not the whole table."""
    return grad.coalesce().values() if grad.is_sparse else grad


def _stacked_sq_sum(norms: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of 0-d norms (on one device, or moved to the first one's), as a 0-d tensor."""
    if not norms:
        return torch.zeros((), dtype=torch.float32)
    device = norms[0].device
    return torch.stack([n.to(device) for n in norms]).square().sum()


def _record_incoming(meter: weakref.ref, index: int, grad: torch.Tensor) -> None:
    """A parameter's gradient hook: hand micro-batch k's gradient to the meter, if it still exists."""
    alive = meter()
    if alive is not None:
        alive._record(index, grad)


def _cumsum(values: Iterable[float]) -> Iterable[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


class LocalGradientNormHook:
    """A DDP communication hook that notes each rank's local gradient norm before the all-reduce.

    With P >= 2 processes, each rank's accumulated local window gradient is a small batch (its own
    items) and the all-reduced gradient the big batch (all items): no extra pass, one fp32 norm per
    bucket and one tiny all-reduce per optimizer step. It all-reduces exactly like DDP's default
    (`allreduce_hook`: mean over ranks), and replaces any other comm hook (DDP takes only one)::

        hook = LocalGradientNormHook(model.parameters())
        model.register_comm_hook(state=None, hook=hook.comm_hook)  # the DDP wrapper accelerator.prepare returned
        ...
        hook.start_window(grad_scale=num_processes / total_items_in_window)
        (the window's backward passes; the last one syncs)
        measured = hook.window_result(local_items, total_items,
                                      reduce_mean=lambda t: accelerator.reduce(t, "mean"))
        if measured is not None:
            tracker.update(*measured)

    `reduce_mean` averages a small tensor over ranks (without it each rank uses its own small batch:
    still unbiased, noisier, and ranks then report different values).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.start_window(1.0)

    def start_window(self, grad_scale: float) -> None:
        """Call before the window's first backward; grad_scale as in the module doc."""
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale={grad_scale!r}: must be finite and > 0")
        self.grad_scale = float(grad_scale)
        self._local_sq: torch.Tensor | None = None

    # No annotations: DDP rejects any but the real types, and this module's annotations are strings.
    def comm_hook(self, process_group, bucket):
        """The hook to register: `ddp_model.register_comm_hook(state=None, hook=hook.comm_hook)`."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # Undivided local gradient: DDP leaves the division by world size to the hook.
        sq = _sq(bucket.buffer())
        self._local_sq = sq if self._local_sq is None else self._local_sq + sq
        return allreduce_hook(process_group, bucket)

    def window_result(
        self,
        local_items: float,
        total_items: float,
        reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
        big_sq: torch.Tensor | float | None = None,
    ) -> tuple[float, float, float, float] | None:
        """(g_small_sq, b_small, g_big_sq, b_big) after the window's synced backward and before
        clipping, or None when the hook did not run this window (on any rank, with `reduce_mean`).

        local_items: the items this rank carried in the window; total_items: all ranks' items.
        With `reduce_mean` every rank must call this (it all-reduces one 2-element tensor).
        big_sq: the squared norm of the synced `.grad` where the loop has it already (clipping's norm,
        as in `MicroGradientNorms.window_result`); without it, one pass over `.grad`.
        """
        c = self.grad_scale
        local_sq = self._local_sq
        self._local_sq = None
        device = local_sq.device if local_sq is not None else torch.device("cpu")
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        # No raising here: the other ranks would wait in reduce_mean. A rank without items (an uneven
        # last window) or a window the hook missed makes the row NaN, and every rank returns None.
        if local_sq is None or not 0 < local_items < total_items:
            row = torch.full((2,), math.nan, device=device, dtype=dtype)
        else:
            # This rank's .grad sum is c x (its item-gradient sum): its mean gradient is that / (c n_r).
            row = torch.stack(
                [
                    (local_sq / (c * local_items) ** 2).to(dtype),
                    torch.tensor(1.0 / local_items, device=device, dtype=dtype),
                ]
            )
        if reduce_mean is not None:
            row = reduce_mean(row)
        g_small_sq, inv_b = row.cpu().tolist()
        if not (math.isfinite(g_small_sq) and math.isfinite(inv_b)):
            return None
        # After the sync, .grad = (c / P) x (sum over all items' gradients): the mean is .grad x P / (c T).
        factor = _world_size() / (c * total_items)
        g_big_sq = (grad_sq_norm(self.parameters) if big_sq is None else float(big_sq)) * factor**2
        return g_small_sq, 1.0 / inv_b, g_big_sq, float(total_items)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# -- recommendation ----------------------------------------------------------------------------------


def recommend_batch(
    b_simple: float,
    plan_micro: int,
    num_processes: int = 1,
    *,
    items_per_sample: float = 1.0,
    rounding: str = "multiple",
    min_batch: int | None = None,
    max_batch: int | None = None,
) -> int:
    """An effective batch (in samples) near B_simple that the plan can reach exactly.

    b_simple: the critical batch in items (samples, or tokens: then pass items_per_sample = mean
    tokens per sample). rounding="multiple": the nearest multiple of plan_micro x num_processes
    (at least one); rounding="power_of_two": the nearest power of two in log scale (at least
    num_processes). min_batch/max_batch clamp the result. Raises ValueError on bad input.
    """
    if b_simple is None or not math.isfinite(b_simple) or b_simple <= 0:
        raise ValueError(f"b_simple={b_simple!r}: needs a positive, finite noise scale (measure more steps)")
    if plan_micro < 1 or num_processes < 1:
        raise ValueError(f"plan_micro={plan_micro!r}, num_processes={num_processes!r}: both must be >= 1")
    if not (math.isfinite(items_per_sample) and items_per_sample > 0):
        raise ValueError(f"items_per_sample={items_per_sample!r}: must be > 0")
    target = b_simple / items_per_sample
    if rounding == "multiple":
        unit = plan_micro * num_processes
        batch = max(1, math.floor(target / unit + 0.5)) * unit
    elif rounding == "power_of_two":
        batch = max(num_processes, 2 ** max(0, round(math.log2(target))))
    else:
        raise ValueError(f"rounding={rounding!r}: use 'multiple' or 'power_of_two'")
    if min_batch is not None:
        batch = max(batch, min_batch)
    if max_batch is not None:
        batch = min(batch, max_batch)
    return int(batch)


def clip_norm_serves_noise(engine: str | None, model: torch.nn.Module, loss_scaled: bool) -> bool:
    """Whether the norm gradient clipping returns can be the noise meter's big-batch norm (saving the
    meter its own pass over `.grad`): the plain and DDP paths, whose clip norm is the norm of exactly
    the gradient the meter would read, taken in fp32 or wider (gradients of fp32 or fp64 weights).
    Not under FSDP or DeepSpeed (their norm is over shards, or absent before a first step), nor for
    half-precision weights (clipping norms those in their own dtype), nor with a loss scaler (fp16:
    whether clipping's norm is of scaled or unscaled gradients is the scaler's private state)."""
    if engine is not None or loss_scaled:
        return False
    return all(p.dtype in (torch.float32, torch.float64) for p in model.parameters() if p.requires_grad)


class NoiseMeter:
    """One object for a training loop: measures B_simple the cheapest way the layout allows.

    Picks `MicroGradientNorms` (one process, accumulation >= 2) or `LocalGradientNormHook`
    (several DDP ranks), and feeds a `NoiseScaleTracker`. On several ranks the local gradient is
    read in a DDP communication hook registered on `model` (the wrapper `accelerator.prepare`
    returned), or, with `deferred_sync` (gradients all-reduced by the caller after the window, as
    accum does under OOM recovery), by `before_all_reduce()` just before that all-reduce.
    `.unavailable` is the one line to print when neither applies. Per window:
    `start_window(grad_scale)`, `after_backward(items)` after each micro-batch, then
    `finish_window(local_items, total_items, reduce_mean)` before clipping (or after it, with
    `big_sq` = clipping's norm squared, where `clip_norm_serves_noise` allows: no loss scaler). `accum.Accumulator`
    makes these calls in this order; a loop of one's own must too.
    """

    def __init__(self, model: torch.nn.Module, num_processes: int, accumulation_steps: int,
                 tracker: NoiseScaleTracker | None = None, deferred_sync: bool = False):
        self.tracker = tracker or NoiseScaleTracker()
        self.method = measurement_method(num_processes, accumulation_steps)
        self.unavailable = describe_unavailable(num_processes, accumulation_steps)
        self._micro: MicroGradientNorms | None = None
        self._hook: LocalGradientNormHook | None = None
        if self.method == "micro_batches":
            self._micro = MicroGradientNorms(model.parameters())
        elif self.method == "ranks":
            self._hook = LocalGradientNormHook(model.parameters())
            if not deferred_sync:
                model.register_comm_hook(state=None, hook=self._hook.comm_hook)

    def start_window(self, grad_scale: float) -> None:
        for meter in (self._micro, self._hook):
            if meter is not None and grad_scale > 0:
                meter.start_window(grad_scale)

    def after_backward(self, items: float) -> None:
        if self._micro is not None and items > 0:
            self._micro.after_backward(items)

    def before_all_reduce(self) -> None:
        """With deferred sync: note this rank's local window gradient before the caller averages it."""
        if self._hook is not None:
            self._hook._local_sq = _sq_norm_tensor(p.grad for p in self._hook.parameters)

    def finish_window(self, local_items: float, total_items: float,
                      reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      big_sq: torch.Tensor | float | None = None) -> float | None:
        """Update the tracker from this window; return the smoothed B_simple (None until known).
        big_sq: the squared norm of `.grad` before clipping, where the loop has it (see
        `MicroGradientNorms.window_result`)."""
        measured = None
        if self._micro is not None:
            measured = self._micro.window_result(big_sq)
        elif self._hook is not None:
            measured = self._hook.window_result(local_items, total_items, reduce_mean, big_sq)
        if measured is not None:
            self.tracker.update(*measured)
        return self.tracker.b_simple
