"""Exact windows under DeepSpeed, whose engine divides every backward by its own fixed count: pure arithmetic.

Accelerate leaves the loss division to the DeepSpeed engine, which divides every backward by its
`gradient_accumulation_steps` (fixed when the engine is built; here G), whatever the window's real
length, and averages the gradients over ranks. A window of n < G micro-batches (a partial last window)
would then get n/G of its gradient. accum therefore pads every window to G micro-batches with empty
ones of zero weight (every rank runs every micro-batch: ZeRO reduces in backward and, at stage 3,
gathers weights in forward) and back-propagates each loss sum x G x processes / window items: the
engine's division by G and its average over ranks cancel, and the gradient is the window's item mean.
Accelerate 1.15 marks the engine's step boundary from `sync_gradients` (the window's end); the padding
keeps the count at G for engines that count for themselves.

A window cut into more than G micro-batches cannot be padded: token-budget cutting (windows cut into
varying counts) and OOM recovery (a replay cuts into more) are refused under DeepSpeed, in one line.
"""

from __future__ import annotations

from typing import Any

from accum.errors import ConfigError
from accum.loss import backward_scale


def padding_to_engine(micro_batches: int, engine_steps: int) -> int:
    """How many empty micro-batches bring a window of `micro_batches` up to the engine's `engine_steps`.
    Raises ConfigError (one line) when the window holds more than the engine counts, or a count is < 1."""
    if micro_batches < 1 or engine_steps < 1:
        raise ValueError(f"need at least one micro-batch and one engine step, got {micro_batches}, {engine_steps}")
    if micro_batches > engine_steps:
        raise ConfigError(f"a window of {micro_batches} micro-batches is more than DeepSpeed's "
                          f"gradient_accumulation_steps {engine_steps}, which the engine fixes at start: "
                          "plan with at least that many accumulation steps, or cut windows by samples")
    return engine_steps - micro_batches


def pad_to_engine(micro_batches: list[Any], engine_steps: int, empty: Any = None) -> list[Any]:
    """`micro_batches` followed by `empty` as many times as `padding_to_engine` says."""
    return list(micro_batches) + [empty] * padding_to_engine(len(micro_batches), engine_steps)


def engine_backward_scale(engine_steps: int, num_processes: int, window_items: int) -> float:
    """Factor for a micro-batch's loss *sum* under DeepSpeed: the engine divides by `engine_steps` (not by
    the window's length) and averages over `num_processes`; the result is the window's item mean."""
    return backward_scale(engine_steps, num_processes, window_items)


def refuse_token_cutting(cut: str) -> None:
    """Raise ConfigError (one line) for a plan cut by a token budget under DeepSpeed."""
    if cut == "tokens":
        raise ConfigError("token-budget cutting does not work under DeepSpeed: it cuts windows into varying counts "
                          "of micro-batches, and the engine divides by a count fixed at start; use `cut_by` samples")


def engine_steps_of(accelerator: Any) -> int | None:
    """The DeepSpeed engine's gradient_accumulation_steps (the prepared engine's, else the plugin's
    config), or None when the accelerator does not say."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        return int(wrapped.engine.gradient_accumulation_steps())
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    value = getattr(plugin, "deepspeed_config", {}).get("gradient_accumulation_steps") if plugin else None
    return int(value) if isinstance(value, int) else None
