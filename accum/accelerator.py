"""build_accelerator(plan): an Accelerator whose accumulation steps are the plan's."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin

from accum.plan import Plan


def build_accelerator(
    plan: Plan,
    mixed_precision: str | None = None,
    log_with: str | list[str] | None = None,
    project_dir: str | None = None,
    *,
    sync_with_dataloader: bool = False,
    **kwargs: Any,
) -> Accelerator:
    """Return an Accelerator with `gradient_accumulation_steps == plan.accumulation_steps`.

    The steps go through a GradientAccumulationPlugin because the sync behaviour must
    be set: with windows fetched ahead, `sync_with_dataloader=True` (Accelerate's
    default) forces syncs that follow the fetching, not the backward passes
    (docs/architecture.md: 4 optimizer steps measured in one window). Loops that fetch windows
    call `begin_window(accelerator, n)` at each window start. Pass
    `sync_with_dataloader=True` for a plain loop over a prepared DataLoader.
    Raises ValueError when kwargs also set the steps (Accelerate refuses both).
    """
    if "gradient_accumulation_steps" in kwargs or "gradient_accumulation_plugin" in kwargs:
        raise ValueError("build_accelerator sets the accumulation steps from the plan; do not pass them too")
    plugin = GradientAccumulationPlugin(
        num_steps=plan.accumulation_steps, sync_with_dataloader=sync_with_dataloader, adjust_scheduler=False
    )
    if log_with == "none":
        log_with = None
    return Accelerator(
        gradient_accumulation_plugin=plugin,
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        **kwargs,
    )


def begin_window(accelerator: Accelerator, num_micro_batches: int) -> None:
    """Start an accumulation window of `num_micro_batches` micro-batches.

    `accumulate()` then syncs exactly on the window's last micro-batch, and
    `backward()` divides by the window's real length (a partial last window too).
    """
    if num_micro_batches <= 0:
        raise ValueError(f"a window needs at least one micro-batch, got {num_micro_batches}")
    accelerator.gradient_accumulation_steps = num_micro_batches
    accelerator.step = 0
