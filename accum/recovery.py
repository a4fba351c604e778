"""Out-of-memory recovery, the one owner: attempt, agree across ranks, shrink at the same effective
batch, replay. Training windows (accum/window.py), evaluation batches and the planner's probes
(accum/probe.py) all go through the two functions at the bottom of this module.

A run that fit at step 0 can run out at step 5,000 (longer sequences, fragmentation, another
process). The answer here keeps the effective batch, and so the training, unchanged: drop the
window's gradients, shrink the micro-batch to the next size that divides the per-process batch
(about half), grow the accumulation to match, and replay the same window from its start. With
exact loss normalisation (accum/loss.py) the replayed window's gradient equals the failed one's
would-have-been gradient, so no optimizer step is lost, doubled or taken on a partial window.

Pure parts (no device, no model), tested without an OOM:

- `smaller_micro_batch` / `larger_micro_batch`: the next size down or up that divides the share.
- `shrink_plan` / `grow_plan`: a new Plan with the same effective batch.
- `AdaptiveBatch`: the decisions (OOM -> shrink; memory pressure -> shrink; `regrow` quiet windows
  -> grow back), with a ceiling that an OOM lowers for good, a cool-down that doubles each time a
  regrow is followed by pressure, and at most `max_adjustments` optional adjustments: no thrashing.
  Every rank that feeds it the same agreed inputs decides the same.

And the two functions that touch devices:

- `agree_max(values, device)`: the maxima of a few numbers over all ranks, one all-reduce; the only
  "did any rank fail" collective in accum (the planner's probes use it too).
- `run_with_recovery(attempt, limit, shrink, ...)`: call `attempt(limit)`; an OOM on any rank makes
  every rank free memory outside the `except` block, shrink the limit and call again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from accum.oom import free_memory, is_oom
from accum.plan import Plan, divisors, replan

__all__ = [
    "AdaptiveBatch",
    "Decision",
    "OutOfMemoryError",
    "advice",
    "agree_max",
    "attempt_on_every_rank",
    "grow_plan",
    "larger_micro_batch",
    "run_with_recovery",
    "shrink_plan",
    "smaller_micro_batch",
]

T = TypeVar("T")
L = TypeVar("L")

ADVICE = ("enable `gradient_checkpointing`, use an 8-bit optimizer (`optimizer` adamw_8bit), "
          "or lower `max_seq_len`")


class OutOfMemoryError(RuntimeError):
    """Out of memory where shrinking the micro-batch cannot help (micro-batch 1, or the optimizer step).

    The message is one line: where it happened, and what to try."""


def advice(where: str, optimizer_step: int | None = None, micro_batch_size: int = 1) -> str:
    """The one-line message for an OOM that shrinking cannot fix. `optimizer_step` is the step being
    taken (1-based, None if unknown); `where` is 'forward/backward', 'optimizer step' or 'evaluation'."""
    at = f" at optimizer step {optimizer_step}" if optimizer_step is not None else ""
    if where == "optimizer step":
        return (f"out of memory in optimizer.step(){at}: a smaller micro-batch "
                "does not help there (the update needs memory for all parameters at once); use an 8-bit "
                "optimizer (`optimizer` adamw_8bit) or SGD, or train fewer parameters")
    return (f"out of memory in {where}{at} with micro-batch "
            f"{micro_batch_size}, the smallest there is: {ADVICE}")


_divisors = divisors  # O(sqrt(n)): a per-process batch of 2**40 stays instant


def smaller_micro_batch(micro_batch_size: int, per_process: int) -> int | None:
    """The largest divisor of `per_process` at most half of `micro_batch_size` (at least 1), or None
    when `micro_batch_size` is already 1. Raises ValueError for non-positive sizes."""
    if micro_batch_size <= 0 or per_process <= 0:
        raise ValueError(f"sizes must be positive, got micro {micro_batch_size}, per process {per_process}")
    if micro_batch_size == 1:
        return None
    half = max(1, micro_batch_size // 2)
    return max(d for d in _divisors(per_process) if d <= half)


def larger_micro_batch(micro_batch_size: int, per_process: int, ceiling: int) -> int | None:
    """The smallest divisor of `per_process` at least twice `micro_batch_size`, else the largest one
    above it, never above `ceiling`; None when nothing larger is allowed."""
    if micro_batch_size <= 0 or per_process <= 0:
        raise ValueError(f"sizes must be positive, got micro {micro_batch_size}, per process {per_process}")
    above = [d for d in _divisors(per_process) if micro_batch_size < d <= ceiling]
    if not above:
        return None
    doubled = [d for d in above if d >= 2 * micro_batch_size]
    return min(doubled) if doubled else max(above)


def limit_of(plan: Plan) -> int:
    """What a replay shrinks: the token budget of a token plan, else the largest micro-batch."""
    return plan.micro_batch_tokens if plan.cut == "tokens" else plan.micro_batch_size


def _adjusted(plan: Plan, limit: int) -> Plan:
    """`plan` at another limit, split the same way, with the same effective batch."""
    if plan.cut == "samples":
        per_process = plan.effective_batch_size // plan.num_processes
        new = dataclasses.replace(plan, micro_batch_size=limit, accumulation_steps=per_process // limit)
    elif plan.cut == "balanced":
        new = replan(plan, max_micro_batch=limit)
    else:
        new = replan(plan, micro_batch_tokens=limit)
    return dataclasses.replace(new, source="adjusted", probes=())


def shrink_plan(plan: Plan) -> Plan | None:
    """The plan with about half the micro-batch (the next divisor of the share for a fixed split; half
    the token budget for a token plan) and the same effective batch; None at micro-batch 1."""
    if plan.micro_batch_size == 1:
        return None
    if plan.cut == "samples":
        per_process = plan.effective_batch_size // plan.num_processes
        return _adjusted(plan, smaller_micro_batch(plan.micro_batch_size, per_process))
    return _adjusted(plan, max(1, limit_of(plan) // 2))


def grow_plan(plan: Plan, ceiling: int) -> Plan | None:
    """The plan with about twice the micro-batch (in the plan's own unit), at most `ceiling` (a
    limit that `limit_of` measures), same effective batch; or None when nothing larger is allowed."""
    if plan.cut == "samples":
        per_process = plan.effective_batch_size // plan.num_processes
        micro = larger_micro_batch(plan.micro_batch_size, per_process, ceiling)
        return None if micro is None else _adjusted(plan, micro)
    limit = min(2 * limit_of(plan), ceiling)
    return None if limit <= limit_of(plan) else _adjusted(plan, limit)


@dataclass(frozen=True)
class Decision:
    """A change of plan: the new plan, the old one, why (one short phrase), and the first optimizer
    step (1-based) that trains with the new plan, when the caller knows it."""

    old: Plan
    new: Plan
    reason: str
    optimizer_step: int | None = None

    def record(self, **extra: Any) -> dict[str, Any]:
        """The fields of an adjustment entry (for AccumulationStats.record_adjustment)."""
        return {"old_micro_batch_size": self.old.micro_batch_size, "new_micro_batch_size": self.new.micro_batch_size,
                "old_accumulation_steps": self.old.accumulation_steps,
                "new_accumulation_steps": self.new.accumulation_steps,
                "effective_batch_size": self.new.effective_batch_size, "reason": self.reason, **extra}

    def describe(self) -> str:
        """`micro-batch 8 -> 4, accumulation 1 -> 2 (effective batch 8 unchanged): <reason>`."""
        return (f"micro-batch {self.old.micro_batch_size} -> {self.new.micro_batch_size}, accumulation "
                f"{self.old.accumulation_steps} -> {self.new.accumulation_steps} (effective batch "
                f"{self.new.effective_batch_size} unchanged): {self.reason}")


class AdaptiveBatch:
    """Decides when the micro-batch changes; holds the current plan.

    - `on_oom()`: always shrinks (a failed window must be replayed smaller), and lowers the ceiling
      below the size that failed, so regrowing never returns to it. Returns None at micro-batch 1.
    - `after_window(peak_fraction)`: with `memory_pressure` set, a window whose peak passed that
      fraction of the budget shrinks at once, before anything fails. With `regrow` > 0, `regrow`
      windows in a row without pressure (and at least `cooldown` since the last adjustment) grow back
      toward the ceiling; each time pressure follows a regrow, the wait doubles. Both stop after
      `max_adjustments` of their own (OOM shrinks do not count and never stop).

    The inputs must be agreed on by all ranks (the any-rank OOM flag, the largest peak), so that
    every rank takes the same decisions.
    """

    def __init__(self, plan: Plan, memory_pressure: float | None = None, regrow: int = 0,
                 max_adjustments: int = 8, cooldown: int | None = None):
        if memory_pressure is not None and not 0 < memory_pressure <= 1:
            raise ValueError(f"memory_pressure={memory_pressure!r}: must be a fraction in (0, 1]")
        if regrow < 0 or max_adjustments < 0:
            raise ValueError(f"regrow={regrow!r} and max_adjustments={max_adjustments!r} must be >= 0")
        self.plan = plan
        self.memory_pressure = memory_pressure
        self.regrow = regrow
        self.max_adjustments = max_adjustments
        self.cooldown = cooldown if cooldown is not None else max(regrow, 1)
        self.ceiling = limit_of(plan)  # never grow above the planned size or a size that failed
        self.optional_adjustments = 0  # pressure shrinks and regrows (OOM shrinks are not optional)
        self.windows_since_adjustment = 0
        self.quiet_windows = 0
        self.regrow_wait = regrow  # doubles whenever pressure follows a regrow
        self.last_reason = ""

    def _adopt(self, new: Plan, reason: str) -> Decision:
        decision = Decision(self.plan, new, reason)
        self.plan, self.last_reason = new, reason
        self.windows_since_adjustment = 0
        self.quiet_windows = 0
        return decision

    def on_oom(self, where: str = "forward/backward") -> Decision | None:
        """The window failed with OOM on some rank: the smaller plan to replay it with, or None at
        micro-batch 1 (nothing left to shrink)."""
        new = shrink_plan(self.plan)
        if new is None:
            return None
        self.ceiling = min(self.ceiling, limit_of(new))
        return self._adopt(new, f"out of memory in {where}")

    def after_window(self, peak_fraction: float | None = None) -> Decision | None:
        """After a completed window whose peak memory was `peak_fraction` of the budget (largest over
        ranks; None if unknown): the plan for the next window if it changes, else None."""
        self.windows_since_adjustment += 1
        pressed = (self.memory_pressure is not None and peak_fraction is not None
                   and peak_fraction > self.memory_pressure)
        self.quiet_windows = 0 if pressed else self.quiet_windows + 1
        if self.optional_adjustments >= self.max_adjustments:
            return None
        if pressed:
            # act at once, cool-down or not: the next window may be the one that fails
            new = shrink_plan(self.plan)
            if new is None:
                return None
            if self.last_reason.startswith("regrow"):
                self.regrow_wait *= 2  # the grown size pressed memory again: wait longer next time
            self.optional_adjustments += 1
            return self._adopt(new, f"memory pressure: peak {peak_fraction:.0%} of the budget "
                                    f"> {self.memory_pressure:.0%}")
        if self.regrow and self.quiet_windows >= self.regrow_wait and self.windows_since_adjustment >= self.cooldown:
            new = grow_plan(self.plan, self.ceiling)
            if new is None:
                return None
            self.optional_adjustments += 1
            return self._adopt(new, f"regrow: {self.quiet_windows} windows without memory pressure")
        return None


def agree_max(values: Sequence[float], device: torch.device | str | None = None) -> list[float]:
    """The maxima of `values` over all ranks of the default process group: one all-reduce, none on a
    single process. "Did any rank fail" is a flag (1.0 failed) among the values; the slowest rank's
    time or the largest peak ride on the same collective. Every rank must call it with as many values."""
    local = [float(value) for value in values]
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return local
    # gloo reduces CPU tensors only; NCCL only device tensors
    device = torch.device("cpu") if dist.get_backend() == "gloo" else torch.device(device or "cuda")
    tensor = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def attempt_on_every_rank(
    attempt: Callable[[], T],
    device: torch.device | str | None = None,
    measure: Callable[[], Sequence[float]] | None = None,
) -> tuple[T | None, list[float]]:
    """Run `attempt()`, catching only an out-of-memory error; then every rank learns whether any rank
    ran out, in one all-reduce that also carries the maxima of `measure()` (e.g. peak memory).

    Returns (what attempt returned, or None when any rank ran out; [failed flag, *maxima]). Any
    other exception propagates unchanged. `attempt` must run no collective that a failing rank
    would skip (e.g. DDP's all-reduce inside backward): a rank that ran out would leave it waiting.
    """
    result, failed = None, False
    try:
        result = attempt()
    except Exception as exc:  # noqa: BLE001 - only OOMs are kept, below
        if not is_oom(exc):
            raise
        failed = True
    agreed = agree_max([float(failed), *(measure() if measure is not None else ())], device)
    return (None if agreed[0] > 0 else result), agreed


def run_with_recovery(
    attempt: Callable[[L], T],
    limit: L,
    shrink: Callable[[L], L | None],
    *,
    device: torch.device | str | None = None,
    where: str = "forward/backward",
    cleanup: Callable[[], None] | None = None,
    on_shrink: Callable[[L, L], None] | None = None,
    on_give_up: Callable[[], None] | None = None,
    measure: Callable[[], Sequence[float]] | None = None,
    optimizer_step: int | None = None,
) -> tuple[T, L, list[float]]:
    """Call `attempt(limit)` until it runs on every rank without running out of memory.

    `limit` is what a replay shrinks: a Plan (training windows), a batch size (evaluation), a token
    budget. After an OOM on any rank, every rank calls `cleanup()` (drop gradients), frees memory,
    asks `shrink(limit)` for the next limit and calls `on_shrink(old, new)`, then replays. When
    `shrink` returns None (nothing smaller), `on_give_up()` runs (save a checkpoint) and
    OutOfMemoryError is raised, naming `where`. Returns (the result, the limit it ran at, the agreed
    [0.0, *maxima of measure()]). Non-OOM errors propagate unchanged.
    """
    while True:
        result, agreed = attempt_on_every_rank(lambda at=limit: attempt(at), device, measure)
        if agreed[0] == 0:
            return result, limit, agreed
        if cleanup is not None:
            cleanup()
        free_memory()  # outside the except block: its traceback no longer pins the failed step's tensors
        new = shrink(limit)
        if new is None:
            if on_give_up is not None:
                on_give_up()
            size = getattr(limit, "micro_batch_size", limit)
            raise OutOfMemoryError(advice(where, optimizer_step, size if isinstance(size, int) else 1))
        if on_shrink is not None:
            on_shrink(limit, new)
        limit = new
