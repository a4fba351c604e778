"""Recover from out-of-memory mid-training without changing the effective batch.

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
  regrow is followed by pressure, and at most `max_adjustments` optional adjustments: no thrashing. Every rank that feeds it the same agreed inputs decides the same.

And a small helper for anyone's loop, `run_with_recovery(attempt, batch)`: call `attempt(plan)`,
and on OOM free memory outside the `except` block, shrink, call again. Several ranks must agree
that a window failed before anyone steps: `any_rank(flag, accelerator)` is that one all-reduce.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from accum.oom import free_memory, is_oom
from accum.plan import Plan

__all__ = [
    "AdaptiveBatch",
    "Decision",
    "OutOfMemoryError",
    "advice",
    "any_rank",
    "grow_plan",
    "larger_micro_batch",
    "run_with_recovery",
    "shrink_plan",
    "smaller_micro_batch",
]

T = TypeVar("T")

ADVICE = ("enable --gradient-checkpointing, use an 8-bit optimizer (--optimizer adamw_8bit), "
          "or lower --max-seq-len")


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
                "optimizer (--optimizer adamw_8bit) or SGD, or train fewer parameters")
    return (f"out of memory in {where}{at} with micro-batch "
            f"{micro_batch_size}, the smallest there is: {ADVICE}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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


def _with_micro(plan: Plan, micro: int) -> Plan:
    per_process = plan.micro_batch_size * plan.accumulation_steps
    return dataclasses.replace(plan, micro_batch_size=micro, accumulation_steps=per_process // micro,
                               source="adjusted", probes=())


def shrink_plan(plan: Plan) -> Plan | None:
    """The plan with the next smaller micro-batch and the same effective batch; None at micro-batch 1."""
    per_process = plan.micro_batch_size * plan.accumulation_steps
    micro = smaller_micro_batch(plan.micro_batch_size, per_process)
    return None if micro is None else _with_micro(plan, micro)


def grow_plan(plan: Plan, ceiling: int) -> Plan | None:
    """The plan with the next larger micro-batch (at most `ceiling`), same effective batch; or None."""
    per_process = plan.micro_batch_size * plan.accumulation_steps
    micro = larger_micro_batch(plan.micro_batch_size, per_process, ceiling)
    return None if micro is None else _with_micro(plan, micro)


@dataclass(frozen=True)
class Decision:
    """A change of plan: the new plan, the old one, and why (one short phrase)."""

    old: Plan
    new: Plan
    reason: str

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
        self.ceiling = plan.micro_batch_size  # never grow above the planned size or a size that failed
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
        self.ceiling = min(self.ceiling, new.micro_batch_size)
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


def any_rank(flag: bool | float, accelerator: Any = None, *values: float) -> list[float]:
    """All-reduce (max) of [flag, *values] over the ranks: one collective, skipped on a single
    process. Returns the maxima as floats (flag first: > 0 means some rank raised it)."""
    local = [float(flag), *map(float, values)]
    if accelerator is None or accelerator.num_processes <= 1:
        return local
    tensor = torch.tensor(local, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, "max").tolist()


def run_with_recovery(attempt: Callable[[Plan], T], batch: AdaptiveBatch, *, optimizer: Any = None,
                      on_adjust: Callable[[Decision], None] | None = None, where: str = "forward/backward") -> T:
    """Call `attempt(plan)` until it returns without OOM, shrinking the plan after each OOM.

    `attempt` runs one whole window (all its micro-batches) at the plan it is given and must start
    from zero gradients; after an OOM the gradients are dropped (`optimizer.zero_grad`) and memory is
    freed outside the `except` block before the replay. Single process only: with several ranks,
    agree on the failure with `any_rank` instead. Returns what `attempt` returns; raises
    OutOfMemoryError at micro-batch 1, and any non-OOM error unchanged.
    """
    while True:
        try:
            return attempt(batch.plan)
        except Exception as exc:
            if not is_oom(exc):
                raise
        # out here, not in the except block: its traceback would keep the failed step's tensors alive
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        free_memory()
        micro = batch.plan.micro_batch_size
        decision = batch.on_oom(where)
        if decision is None:
            raise OutOfMemoryError(advice(where, None, micro))
        if on_adjust is not None:
            on_adjust(decision)
