"""One exact accumulation window, end to end, for any Accelerate loop: `Accumulator.step(samples)`.

A *window* is the data of one optimizer step on all ranks. `step` takes the window's samples (the
same list on every rank, e.g. from `WindowSampler`), and in this order (docs/architecture.md):

1. cuts this rank's share into micro-batches (`cut(samples, limit)`; ranks with fewer get empty
   ones), collates them on the CPU and counts their loss items there (no host-device sync);
2. agrees on the window's item and token counts over all ranks (one all-reduce);
3. runs the micro-batches inside `accelerator.accumulate()` after `begin_window`, back-propagating
   each one's loss *sum* x accumulation x processes / window items, so Accelerate's division and
   DDP's average cancel and the gradient is the window's item mean (accum/loss.py);
4. with OOM recovery, agrees whether any rank ran out; if one did, drops the gradients, shrinks the
   micro-batch at the same effective batch and replays the window (accum/recovery.py); on several
   DDP ranks the gradient all-reduce then waits until every rank's backward passes succeeded;
5. measures the gradient noise scale (before clipping), refuses a non-finite loss or gradient,
   clips, steps the optimizer, checks in one fused pass that no weight became NaN/inf (a huge but
   finite LR, weight decay or gradient can do it; with nonfinite 'skip' such a step is undone from a
   copy kept before it), steps the scheduler once, and zeroes the gradients.

Loss, counts and norms stay on the device until the window ends; then one transfer. What happened
comes back as a `WindowResult`; events go to the callbacks (`Callback`), never to patched code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from accum.accelerator import begin_window
from accum.deepspeed_steps import engine_steps_of, pad_to_engine, refuse_token_cutting
from accum.loss import backward_scale
from accum.noise import NoiseMeter, clip_norm_serves_noise
from accum.oom import is_oom, measured_peak, start_peak_measurement
from accum.plan import Plan
from accum.recovery import AdaptiveBatch, Decision, OutOfMemoryError, advice, limit_of, run_with_recovery
from accum.sharded import (
    clip_grad_norm,
    engine_of,
    gradient_sync,
    is_fully_sharded,
    local_shard,
    refuse_oom_recovery,
)
from accum.stats import AccumulationStats
from accum.windows import cut_for, rank_micro_batches

__all__ = ["Accumulator", "Callback", "EvalResult", "NonFiniteError", "PreparedWindow", "WindowResult",
           "all_reduce_gradients", "evaluate"]

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteError(FloatingPointError):
    """A window's loss or gradient was NaN/inf, or its optimizer step made a weight NaN/inf.
    `optimizer_step` is the step that was refused (1-based). `weights_changed`: False when the refusal
    came before the optimizer step (no weight was changed), True when the step itself produced a
    non-finite weight (nonfinite 'raise' keeps no copy to undo it: the model in memory is lost, the
    last checkpoint is what is left)."""

    def __init__(self, what: str, optimizer_step: int, weights_changed: bool = False):
        self.what, self.optimizer_step, self.weights_changed = what, optimizer_step, weights_changed
        super().__init__(f"{what} at optimizer step {optimizer_step}")


class Callback:
    """Events of an `Accumulator`, for timing, logging or tests; override what you need. Callbacks
    observe; they must not change the gradients or the optimizer."""

    def on_window_start(self, accumulator: Accumulator, samples: Sequence[Any]) -> None:
        """Before a window's first micro-batch is cut (once per window, not per replay)."""

    def on_before_optimizer_step(self, accumulator: Accumulator) -> None:
        """After clipping, right before `optimizer.step()`: `.grad` holds the window's gradient."""

    def on_after_optimizer_step(self, accumulator: Accumulator) -> None:
        """Right after `optimizer.step()` and the scheduler's step, before the gradients are zeroed."""

    def on_window_end(self, accumulator: Accumulator, result: WindowResult) -> None:
        """After the window, with what happened."""


@dataclass(frozen=True)
class WindowResult:
    """What one window did. Counts are over all ranks; `micro_batches` is per rank."""

    optimizer_step: int  # windows done, this one included
    loss: float | None  # mean loss per item over the window (None when not finite)
    items: int  # loss items (tokens or samples)
    samples: int
    tokens: int  # real (unpadded) tokens
    micro_batches: int  # micro-batches each rank ran, empty ones included
    micro_batch_size: int  # samples in this rank's largest micro-batch
    grad_norm: float | None  # global norm before clipping; None when refused before it
    lr: float  # the learning rate this step used
    skipped: bool
    skip_reason: str | None = None
    b_simple: float | None = None  # smoothed gradient noise scale, in loss items
    adjustments: tuple[Decision, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)  # AccumulationStats' record of this step
    padded_tokens: int = 0  # tokens the micro-batches held, padding included (all ranks)

    @property
    def padding_efficiency(self) -> float | None:
        """Real tokens / padded tokens of the window (1.0: no padding)."""
        return self.tokens / self.padded_tokens if self.padded_tokens else None


@dataclass(frozen=True)
class PreparedWindow:
    """A window cut and collated ahead (`Accumulator.prepare`), for the plan it was cut at."""

    samples: Sequence[Any]
    plan: Plan
    micros: list


@dataclass
class _Micro:
    """One collated micro-batch (CPU tensors) and what it carries; `batch` None for an empty one."""

    batch: dict[str, torch.Tensor] | None
    items: int = 0
    samples: int = 0
    tokens: int = 0
    padded: int = 0  # tokens with padding: rows x the longest


def _tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else batch["input_ids"].numel()


def _count_all(loss: Any, batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, int]]:
    """(items, real tokens) of every CPU batch, read with one tensor-to-Python conversion for them
    all: a count per micro-batch would cost a conversion each (on a GPU, each such conversion of a
    device tensor is a host-device synchronisation; here they are CPU tensors, counted ahead)."""
    if not batches:
        return []
    values = torch.stack([torch.stack([torch.as_tensor(loss.count(batch)).reshape(()).to(torch.int64),
                                       torch.as_tensor(_tokens(batch)).reshape(()).to(torch.int64)])
                          for batch in batches])
    return [tuple(row) for row in values.tolist()]


def all_finite(params: list[torch.Tensor], optimizer_state: Any = None, accelerator: Any = None) -> bool:
    """Whether no weight (and, given `optimizer_state`, no floating-point optimizer state) holds a NaN
    or an infinity, agreed over ranks (FSDP shards differ). One fused norm over all of them and one
    host sync per window (one all-reduce of one number with several processes); a norm can overflow
    for huge finite values, so a flagged window is confirmed tensor by tensor before it is refused."""
    tensors = [local_shard(p) for p in params]
    if optimizer_state is not None:
        tensors += [local_shard(v) for p in params for v in optimizer_state.get(p, {}).values()
                    if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    tensors = [t for t in tensors if t.numel()]
    several = accelerator is not None and accelerator.num_processes > 1
    device = accelerator.device if accelerator is not None else (tensors[0].device if tensors else "cpu")
    if tensors:
        largest = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).max()
        flag = (~torch.isfinite(largest)).float().reshape(1).to(device)
    else:
        flag = torch.zeros(1, device=device)
    if several:
        flag = accelerator.reduce(flag, "max")
    if flag.item() == 0:
        return True
    local = float(any(not bool(torch.isfinite(t).all()) for t in tensors))
    if several:
        local = accelerator.reduce(torch.tensor([local], device=device), "max").item()
    return local == 0


class StepUndo:
    """The weights and optimizer state as they were before an optimizer step, in buffers allocated once
    and reused every window, so that a step which made a weight non-finite is undone exactly. The
    optimizer state is kept too: a step that leaves the weights finite may still leave an infinite
    second moment, and undoing the weights alone would keep it."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] | None = None
        self.state: dict[int, dict[str, Any]] = {}

    def take(self, params: list[torch.Tensor], optimizer_state: Any) -> None:
        if self.weights is None or len(self.weights) != len(params):
            self.weights = [torch.empty_like(local_shard(p)) for p in params]
        torch._foreach_copy_(self.weights, [local_shard(p) for p in params])
        taken = {}
        for index, param in enumerate(params):
            entry = optimizer_state.get(param)
            if not entry:
                continue
            kept, copy = self.state.get(index, {}), {}
            for key, value in entry.items():
                if torch.is_tensor(value):
                    buffer = kept.get(key)
                    if not (torch.is_tensor(buffer) and buffer.shape == value.shape and buffer.dtype == value.dtype
                            and buffer.device == value.device):
                        buffer = torch.empty_like(value)
                    copy[key] = buffer.copy_(value)
                else:
                    copy[key] = value
            taken[index] = copy
        self.state = taken

    @torch.no_grad()
    def restore(self, params: list[torch.Tensor], optimizer_state: Any) -> None:
        torch._foreach_copy_([local_shard(p) for p in params], self.weights)
        for index, param in enumerate(params):
            if index not in self.state:  # the bad step was this parameter's first: no state before it
                optimizer_state.pop(param, None)
                continue
            entry = optimizer_state.setdefault(param, {})
            for key in list(entry):
                if key not in self.state[index]:
                    del entry[key]
            for key, value in self.state[index].items():
                current = entry.get(key)
                if torch.is_tensor(value) and torch.is_tensor(current) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    entry[key] = value.clone() if torch.is_tensor(value) else value


def all_reduce_gradients(model: torch.nn.Module, num_processes: int, bucket_bytes: int = 25 * 2**20) -> None:
    """Average the gradients over ranks, as DDP's sync backward would, in flat buckets of ~25 MiB.
    A parameter without a gradient on this rank (no data reached it) joins with zeros."""
    grads = []
    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
    bucket, size = [], 0
    for grad in grads + [None]:
        if grad is not None and (not bucket or (grad.dtype == bucket[0].dtype and size < bucket_bytes)):
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
            continue
        flat = torch._utils._flatten_dense_tensors(bucket)
        torch.distributed.all_reduce(flat)
        flat /= num_processes
        for target, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
            target.copy_(reduced)
        bucket, size = ([grad], grad.numel() * grad.element_size()) if grad is not None else ([], 0)


# The estimator takes each micro-batch for a random draw of the window's items; a cut by length groups samples
# of like length, whose mean gradients share a length-dependent part, so the small-batch norms read high and
# |G|^2 low (measured on the default run: tr(Sigma) 73 against 54, |G|^2 0.033 against 0.22, B_simple 2,199
# against 251 with micro-batches of 8 in the window's order). Ranks' shares are not sorted across ranks.
LENGTH_SORTED_NOISE = (
    "noise scale: micro-batches cut by length hold samples of like length, not random draws, so B_simple reads "
    "high; measure it with `--cut-by samples` (several processes measure across ranks and are not affected)")


class Accumulator:
    """Runs exact accumulation windows for an Accelerate loop: `step(samples)` is one optimizer step.

    accelerator, model, optimizer: as `accelerator.prepare` returned them (the scheduler not
    prepared: Accelerate would step it once per process; here it steps once per optimizer step).
    plan: the Plan whose micro-batch is the cutting limit (`plan_for`, `plan_batch`).
    loss: `accum.TaskLoss(task)` or any object with `count(batch) -> int` and
    `forward(model, batch) -> (loss_sum, outputs)`; collate: list of samples -> dict of CPU tensors.
    cut: the cutting policy `cut(samples, limit) -> micro-batches` (default: the plan's own, FixedSize,
    Balanced or TokenBudget; its `unit` says whether the limit is samples or the plan's token budget).
    max_grad_norm: clip to this norm (None: measure only). recovery: OOM recovery (True, or an
    `AdaptiveBatch` for memory pressure and regrowth; then `memory_budget` in bytes is the peak
    that pressure is measured against). noise_scale: measure B_simple. nonfinite: 'raise'
    (NonFiniteError: before the step nothing changed; a step that made a weight NaN/inf has changed
    them, `weights_changed`) or 'skip' (the window is dropped, or its step undone from a copy of the
    weights and optimizer state kept before it, and counted).
    on_give_up: called before OutOfMemoryError is raised at micro-batch 1 (save a checkpoint).

    A model sharded by FSDP2 (Accelerate's plugin, or `fully_shard` by hand: accum.sharded) is
    accumulated with gradient sync off until the window's last backward, every rank running every
    micro-batch, clipped by the norm over all shards. OOM recovery is refused there on several ranks,
    and under DeepSpeed, with a ConfigError of one line (accum.sharded.refuse_oom_recovery).

    `notes` lists one line per feature that this layout turned off, and why. `state_dict()` holds
    the counters and the noise scale, so `accelerator.register_for_checkpointing(accumulator)`
    resumes them too.
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, plan: Plan, *, loss: Any,
                 collate: Any, scheduler: Any = None, max_grad_norm: float | None = None, cut: Any = None,
                 recovery: bool | AdaptiveBatch = True, memory_budget: int | None = None,
                 noise_scale: bool | NoiseMeter = False, nonfinite: str = "raise", callbacks: Sequence[Callback] = (),
                 on_give_up: Any = None, stats: AccumulationStats | None = None):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r}: use one of {', '.join(NONFINITE_POLICIES)}")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be a finite number >= 0 (0 or None: no clipping)")
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.scheduler = getattr(scheduler, "scheduler", scheduler)  # an AcceleratedScheduler would step per process
        self.loss, self.collate, self.cut = loss, collate, cut if cut is not None else cut_for(plan)
        self.max_grad_norm = max_grad_norm or None
        self.nonfinite, self.callbacks, self.on_give_up = nonfinite, list(callbacks), on_give_up
        self.memory_budget, self._memory_baseline = memory_budget, 0
        self.stats = stats if stats is not None else AccumulationStats(device=accelerator.device)
        self.notes: list[str] = []
        self._plan = plan
        self._pin = torch.device(accelerator.device).type == "cuda"
        # FSDP2: every rank runs every forward (each all-gathers weights), and sync is toggled by hand;
        # DeepSpeed: windows padded to the engine's fixed count, every micro-batch run on every rank
        self.sharded = is_fully_sharded(model)
        self.engine = engine_of(accelerator, model)
        if self.engine == "DeepSpeed":
            refuse_token_cutting(plan.cut)
        self.run_every_micro = self.sharded or self.engine == "DeepSpeed"
        self.adaptive = self._setup_recovery(recovery, plan)
        # several ranks with recovery: no all-reduce inside backward, where an OOM on one rank would
        # leave the others waiting; the gradients are averaged once every rank has succeeded
        self.defer_sync = self.adaptive is not None and accelerator.num_processes > 1
        self.noise = self._setup_noise(noise_scale, plan)
        self._noise_from_clip = self.noise is not None and clip_norm_serves_noise(
            self.engine, self.model, loss_scaled=self.accelerator.scaler is not None)
        self._undo = StepUndo() if nonfinite == "skip" else None

    # -- setup --------------------------------------------------------------------------------------

    def _setup_recovery(self, recovery: bool | AdaptiveBatch, plan: Plan) -> AdaptiveBatch | None:
        if recovery is False or recovery is None:
            return None
        if self.engine is not None:
            refuse_oom_recovery(self.engine, self.accelerator.num_processes)
        return recovery if isinstance(recovery, AdaptiveBatch) else AdaptiveBatch(plan)

    def _setup_noise(self, noise_scale: bool | NoiseMeter, plan: Plan) -> NoiseMeter | None:
        if isinstance(noise_scale, NoiseMeter):
            return noise_scale
        if not noise_scale:
            return None
        meter = NoiseMeter(self.model, self.accelerator.num_processes, plan.accumulation_steps,
                           deferred_sync=self.defer_sync)
        if meter.unavailable:
            self.notes.append(meter.unavailable)
        if meter.method == "micro_batches" and getattr(plan, "cut", "samples") == "tokens":
            self.notes.append(LENGTH_SORTED_NOISE)
        return meter

    # -- the plan in force ----------------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        """The plan in force: OOM recovery and memory pressure change its micro-batch (never its batch)."""
        return self.adaptive.plan if self.adaptive is not None else self._plan

    def use_plan(self, plan: Plan) -> None:
        """Train the next windows with `plan` (a batch schedule changes the effective batch)."""
        self._plan = plan
        if self.adaptive is not None:
            self.adaptive.plan = plan

    # -- one window -----------------------------------------------------------------------------------

    def prepare(self, samples: Sequence[Any]) -> PreparedWindow:
        """Cut this rank's share of a window, collate it (pinned memory on CUDA) and count it: CPU work
        only, no collective and no device, so a loop may run it for the next window in a thread while
        this one trains (`step` takes what it returns). Raises ValueError for an empty window."""
        if len(samples) == 0:
            raise ValueError("a window needs at least one sample")
        plan = self.plan
        return PreparedWindow(samples, plan, self._collate(samples, plan))

    def step(self, samples: Sequence[Any] | PreparedWindow) -> WindowResult:
        """Train one window (`samples`: the window on all ranks, the same sequence on every rank, or
        what `prepare` made of it) and take exactly one optimizer step. Returns a WindowResult. Raises
        NonFiniteError (nonfinite 'raise'; no weight changed), OutOfMemoryError (nothing smaller to
        replay with, or in the optimizer step), ValueError for an empty window."""
        prepared = samples if isinstance(samples, PreparedWindow) else None
        if prepared is not None and prepared.plan is not self.plan:  # prepared before a change of plan
            prepared = None
        samples = samples.samples if isinstance(samples, PreparedWindow) else samples
        if len(samples) == 0:
            raise ValueError("a window needs at least one sample")
        self._emit("on_window_start", samples)
        accelerator, adjustments, initial = self.accelerator, [], self.plan
        micros = prepared.micros if prepared is not None else self._collate(samples, initial)
        local_items, local_tokens = sum(m.items for m in micros), sum(m.tokens for m in micros)
        window_items, window_tokens = local_items, local_tokens
        if accelerator.num_processes > 1:  # the one transfer a window needs before its first backward
            totals = accelerator.reduce(torch.tensor([local_items, local_tokens], device=accelerator.device), "sum")
            window_items, window_tokens = (int(value) for value in totals.tolist())

        def attempt(plan: Plan) -> tuple[torch.Tensor, list[_Micro]]:
            cut = micros if plan is initial else self._collate(samples, plan)  # a replay re-cuts the same samples
            if self.engine == "DeepSpeed":  # the engine divides by its own count: pad to it (then scale by it)
                cut = pad_to_engine(cut, engine_steps_of(accelerator) or plan.accumulation_steps, _Micro(None))
            stand_in = self.collate([samples[0]]) if any(m.batch is None for m in cut) else None
            return self._accumulate(cut, window_items, stand_in), cut

        if self.adaptive is None:
            loss_sum, ran = attempt(initial)
        else:
            (loss_sum, ran), _, agreed = run_with_recovery(
                attempt, initial, lambda plan: self._shrink(adjustments), device=accelerator.device,
                cleanup=lambda: self.optimizer.zero_grad(set_to_none=True), on_give_up=self.on_give_up,
                measure=self._peak_fraction, optimizer_step=self.stats.optimizer_step + 1)
            if self.defer_sync:
                if self.noise is not None:
                    self.noise.before_all_reduce()
                all_reduce_gradients(self.model, accelerator.num_processes)
            self._after_window(agreed[1], adjustments)
        b_simple = None
        if self.noise is not None and not self._noise_from_clip:  # before clipping changes the gradients
            b_simple = self.noise.finish_window(local_items, window_items, lambda t: accelerator.reduce(t, "mean"))
        padded = torch.tensor(float(sum(m.padded for m in ran)), dtype=torch.float64, device=loss_sum.device)
        sums = accelerator.reduce(torch.stack([loss_sum.double(), padded]), "sum")
        norm = self._clip()
        if self._noise_from_clip:  # the meter's big batch is the window's gradient, whose norm clipping took
            # no norm (an engine that does not say): NaN, a window not measured, rather than a pass over
            # gradients clipping may have changed
            big_sq = norm.square() if norm is not None else float("nan")
            b_simple = self.noise.finish_window(local_items, window_items, lambda t: accelerator.reduce(t, "mean"),
                                                big_sq)
        grad_norm, lr, skipped, reason, window_loss, padded_tokens = self._optimizer_step(sums, norm, window_items)
        self.stats.record_window(len(ran), len(samples), window_tokens, int(padded_tokens))
        record = self.stats.record_optimizer_step(loss=window_loss, grad_norm=grad_norm, lr=lr, skipped=skipped)
        result = WindowResult(
            optimizer_step=self.stats.optimizer_step, loss=record["loss"], items=window_items, samples=len(samples),
            tokens=window_tokens, micro_batches=len(ran), micro_batch_size=max(m.samples for m in ran),
            grad_norm=grad_norm, lr=lr, skipped=skipped, skip_reason=reason, b_simple=b_simple,
            adjustments=tuple(adjustments), record=record, padded_tokens=int(padded_tokens))
        self._emit("on_window_end", result)
        return result

    def _collate(self, samples: Sequence[Any], plan: Plan) -> list[_Micro]:
        """This rank's micro-batches at the plan's limit (samples, or a token budget), collated on the
        CPU and counted."""
        accelerator = self.accelerator
        parts = rank_micro_batches(samples, self.cut, limit_of(plan), accelerator.num_processes,
                                   accelerator.process_index)
        batches = [self.collate(part) for part in parts if part]
        counts = iter(_count_all(self.loss, batches))
        collated = iter(batches)
        micros = []
        for part in parts:
            if not part:
                micros.append(_Micro(None))
                continue
            batch = next(collated)
            if self._pin:  # page-locked: the copy to the GPU can then run while the host goes on
                batch = {key: value.pin_memory() for key, value in batch.items()}
            items, tokens = next(counts)
            padded = batch["input_ids"].numel() if "input_ids" in batch else 0
            if tokens == padded and "attention_mask" in batch:
                # no padding: without the mask, transformers' attention skips its all-ones check,
                # a host-device synchronisation in every forward on a GPU
                batch = {key: value for key, value in batch.items() if key != "attention_mask"}
            micros.append(_Micro(batch, items, len(part), tokens, padded))
        return micros

    def _accumulate(self, micros: list[_Micro], window_items: int, stand_in: dict | None) -> torch.Tensor:
        """Forward and backward every micro-batch of the window; return this rank's loss sum (device)."""
        accelerator, model = self.accelerator, self.model
        begin_window(accelerator, len(micros))
        scale = backward_scale(len(micros), accelerator.num_processes, window_items)
        if self.noise is not None:
            self.noise.start_window(accelerator.num_processes / max(window_items, 1) * self._loss_scale())
        if self.adaptive is not None and self.memory_budget:
            self._memory_baseline = start_peak_measurement(accelerator.device)
        loss_total = torch.zeros((), device=accelerator.device)
        with accelerator.no_sync(model) if self.defer_sync else contextlib.nullcontext():
            for micro in micros:
                with accelerator.accumulate(model):
                    empty = micro.batch is None
                    # an empty micro-batch joins the sync step's all-reduce (at zero weight); with
                    # deferred sync there is none in backward, and off the sync step nothing to add;
                    # under FSDP every forward all-gathers, so every rank runs every micro-batch
                    if empty and not self.run_every_micro and (self.defer_sync or not accelerator.sync_gradients):
                        continue
                    batch = {k: v.to(accelerator.device, non_blocking=self._pin)
                             for k, v in (stand_in if empty else micro.batch).items()}
                    loss_sum, _ = self.loss.forward(model, batch)
                    if getattr(self.loss, "mean_of_means", False):
                        to_backward = loss_sum / max(micro.items, 1)
                    else:
                        to_backward = loss_sum * scale
                    with gradient_sync(model, accelerator.sync_gradients):
                        accelerator.backward(to_backward * 0.0 if empty else to_backward)
                if not empty:
                    loss_total += loss_sum.detach()
                    if self.noise is not None:
                        self.noise.after_backward(micro.items)
        return loss_total

    def _shrink(self, adjustments: list[Decision]) -> Plan | None:
        decision = self.adaptive.on_oom("forward/backward")
        if decision is None:
            return None
        self._adjusted(decision, self.stats.optimizer_step + 1, adjustments)  # the replayed step
        return decision.new

    def _adjusted(self, decision: Decision, optimizer_step: int, adjustments: list[Decision]) -> None:
        decision = dataclasses.replace(decision, optimizer_step=optimizer_step)
        adjustments.append(decision)
        self.stats.record_adjustment(**decision.record(optimizer_step=optimizer_step))

    def _peak_fraction(self) -> list[float]:
        """The window's peak as a fraction of the budget, counted as the planner counts it."""
        if not self.memory_budget:
            return [0.0]
        return [measured_peak(self.accelerator.device, self._memory_baseline) / self.memory_budget]

    def _after_window(self, peak_fraction: float | None, adjustments: list[Decision]) -> None:
        """Memory pressure and regrowth decide the next window's micro-batch (this one is done)."""
        decision = self.adaptive.after_window(peak_fraction if self.memory_budget else None)
        if decision is not None:  # this step is done; the next one changes
            self._adjusted(decision, self.stats.optimizer_step + 2, adjustments)

    def _loss_scale(self) -> float:
        """fp16's current loss scale (gradients hold it until clipping unscales them), else 1."""
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def _clip(self) -> torch.Tensor | None:
        """Clip the window's gradients to max_grad_norm (none: measure only); their norm before
        clipping, unscaled under fp16, on the device (None where the engine does not say)."""
        max_norm = self.max_grad_norm if self.max_grad_norm else float("inf")
        # clipping a NaN window's gradients is harmless: a refused window's gradients are dropped
        return clip_grad_norm(self.accelerator, self.model, max_norm)  # over all shards under FSDP

    def _optimizer_step(self, sums: torch.Tensor, norm: torch.Tensor | None, window_items: int):
        """Refuse non-finite, step, schedule, zero: once per window, after clipping (`norm`). `sums` is
        the window's [loss sum, padded tokens] on the device, all ranks together: it comes to the host
        with the gradient norm in the window's one transfer after its last backward. Returns (grad norm,
        the LR the step used, skipped, why skipped, mean loss per item, padded tokens)."""
        accelerator, optimizer = self.accelerator, self.optimizer
        lr = float(optimizer.param_groups[0]["lr"])
        norm = torch.as_tensor(norm if norm is not None else float("nan"), dtype=torch.float64).to(sums.device)
        loss_sum, padded_tokens, grad_norm = torch.cat([sums, norm.reshape(1)]).tolist()
        window_loss = loss_sum / max(window_items, 1)
        if not math.isfinite(window_loss):
            return None, lr, True, self._refuse(f"loss is {window_loss}"), window_loss, padded_tokens
        if accelerator.scaler is None and not math.isfinite(grad_norm):  # fp16's scaler skips on its own
            return grad_norm, lr, True, self._refuse(f"gradient norm is {grad_norm}"), window_loss, padded_tokens
        self._emit("on_before_optimizer_step")
        raw = getattr(optimizer, "optimizer", optimizer)
        params = [p for group in raw.param_groups for p in group["params"] if p.requires_grad]
        if self._undo is not None:
            self._undo.take(params, raw.state)
        failed = False
        try:
            optimizer.step()
        except Exception as exc:  # noqa: BLE001 - only OOMs are turned into advice, below
            if not is_oom(exc):
                raise
            failed = True
        if failed:  # a partial update cannot be replayed exactly, and a smaller micro-batch would not help
            raise OutOfMemoryError(advice("optimizer step", self.stats.optimizer_step + 1))
        skipped = bool(accelerator.optimizer_step_was_skipped)  # fp16: the scaler found inf/nan gradients
        if not skipped and not all_finite(params, raw.state if self._undo is not None else None, accelerator):
            optimizer.zero_grad(set_to_none=True)
            if self._undo is None:
                raise NonFiniteError("a weight became NaN/inf in the optimizer step", self.stats.optimizer_step + 1,
                                     weights_changed=True)
            self._undo.restore(params, raw.state)
            return grad_norm, lr, True, "a weight became NaN/inf in the optimizer step (undone)", window_loss, padded_tokens
        if not skipped and self.scheduler is not None:
            self.scheduler.step()
        self._emit("on_after_optimizer_step")
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr, skipped, "fp16 overflow" if skipped else None, window_loss, padded_tokens

    def _refuse(self, what: str) -> str:
        """A NaN/inf window never updates the weights: drop its gradients, then skip or raise."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite == "raise":
            raise NonFiniteError(what, self.stats.optimizer_step + 1)
        return what

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters, statistics and the noise scale (JSON-able), for resuming."""
        state: dict[str, Any] = {"stats": self.stats.state_dict()}
        if self.noise is not None:
            state["noise"] = self.noise.tracker.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
        if self.noise is not None and state.get("noise"):
            self.noise.tracker.load_state_dict(state["noise"])


# -- evaluation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """Mean loss per item over the evaluation samples on all ranks, the batch size it ran at (per
    process; smaller than asked after an out-of-memory error), and this rank's `on_batch` values."""

    loss: float
    items: int
    batch_size: int
    outputs: list[Any]


def _halve(size: int) -> int | None:
    return size // 2 if size > 1 else None


@torch.no_grad()
def evaluate(accelerator: Any, model: torch.nn.Module, samples: Sequence[Any], collate: Any, loss: Any,
             batch_size: int, *, recovery: bool = True, on_batch: Any = None, on_shrink: Any = None,
             cut: Any = None, should_stop: Any = None) -> EvalResult:
    """Loss over `samples` (the whole evaluation set, the same on every rank; each rank takes its
    contiguous share, so nothing is counted twice), forward only, in eval mode.

    `batch_size` is the limit of one batch in the unit of `cut` (default FixedSize: samples; a
    TokenBudget cuts by length, a budget of tokens per batch counted with padding). `on_batch(batch,
    outputs)` may return something per batch (predictions for a metric); they come back in
    `outputs`, this rank's only. With `recovery`, an out-of-memory error on any rank halves the limit
    on every rank and starts the evaluation again (`on_shrink(old, new)` is told), through the same
    code as training windows (accum/recovery.py). `should_stop()` (local, e.g. whether this process
    got SIGTERM) is asked before each batch on one process; with several, each rank finishes its
    share and the answer rides on the final all-reduce, so that all ranks stop together. Raises
    OutOfMemoryError at a limit of 1, accum.signals.Stopped when `should_stop()` said so.
    """
    from accum.signals import Stopped
    from accum.windows import FixedSize, _Slice, rank_share

    cut = cut if cut is not None else FixedSize()
    start, stop = rank_share(len(samples), accelerator.num_processes, accelerator.process_index)
    share = _Slice(samples, start, stop)
    was_training = model.training
    alone = accelerator.num_processes == 1

    def attempt(limit: int) -> tuple[torch.Tensor, int, list[Any]]:
        model.eval()
        loss_total, items, outputs = torch.zeros((), device=accelerator.device), 0, []
        for number, part in enumerate(cut(share, limit) if len(share) else []):
            if alone and should_stop is not None and should_stop():
                raise Stopped(f"stopped before evaluation batch {number}")
            batch = collate(part)
            items += loss.count(batch)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            loss_sum, logits = loss.forward(model, batch)
            loss_total += loss_sum.detach()
            if on_batch is not None:
                outputs.append(on_batch(batch, logits))
        return loss_total, items, outputs

    try:
        if recovery:
            (loss_total, items, outputs), batch_size, _ = run_with_recovery(
                attempt, batch_size, _halve, device=accelerator.device, where="evaluation", on_shrink=on_shrink)
        else:
            loss_total, items, outputs = attempt(batch_size)
    finally:
        model.train(was_training)
    stop_here = float(not alone and should_stop is not None and bool(should_stop()))
    totals = accelerator.reduce(torch.stack([loss_total.double(), torch.tensor(float(items), dtype=torch.float64,
                                                                               device=accelerator.device),
                                             torch.tensor(stop_here, dtype=torch.float64, device=accelerator.device)]),
                                "sum")
    loss_value, items_total, stop_anywhere = totals.tolist()
    if stop_anywhere > 0:
        raise Stopped("stopped after evaluating")
    return EvalResult(loss_value / max(items_total, 1), int(items_total), batch_size, outputs)
