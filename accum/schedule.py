"""Accumulation schedules: the effective batch changes during a run, the micro-batch does not.

Three kinds, all deciding at window boundaries only (a window is one optimizer step, so no window
ever mixes two accumulation sizes):

- steps:  effective batch keyed by samples (or tokens) seen, e.g. {0: 32, 20000: 64, 60000: 128};
          the change happens at the first window boundary at or past each key.
- ramp:   a linear ramp from `start` to `end` over `over_samples` samples, each value rounded to
          the nearest valid split (a multiple of micro-batch x processes).
- noise:  follow the smoothed gradient noise scale B_simple (McCandlish et al. 2018), bounded by
          [min, max], growing only (doubling, or to the nearest valid split), at most once per
          `cooldown` optimizer steps.

Also `SampleLR`: an LR schedule (constant / linear / cosine with warmup, transformers' formulas)
defined in samples, so warmup and decay stay where they were meant to be when the number of
optimizer steps per sample changes; times the LR rule's factor for the current batch.

Pure: no model, no device. `BatchSchedule.bind(unit)` checks the batches against the split unit
once the micro-batch is known; `decide(progress)` returns a `Change` or None; state_dict() and
load_state_dict() make resume continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from accum.errors import ConfigError, check_positive_int
from accum.scaling import scale_lr

__all__ = ["BatchSchedule", "Change", "Progress", "SampleLR", "lr_shape", "parse_ramp", "schedule_from_config"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class Progress:
    """Where training is after a window, in the units a schedule may key on (all ranks together)."""

    optimizer_step: int
    samples_seen: int
    tokens_seen: int = 0
    b_simple: float | None = None  # smoothed, in loss items (samples, or tokens)
    items_per_sample: float = 1.0  # loss items per sample: 1 for samples, mean tokens for tokens


@dataclass(frozen=True)
class Change:
    """The effective batch changes from `old` to `new` for the next window, and why."""

    old: int
    new: int
    reason: str


def _nearest_multiples(value: int, unit: int) -> str:
    below = (value // unit) * unit
    return " or ".join(str(v) for v in (below, below + unit) if v > 0)


def _check_batch(what: str, batch: int, unit: int, micro: int, processes: int) -> None:
    if batch % unit:
        raise ConfigError(
            f"{what} {batch} cannot be split into micro-batches of {micro} x {processes} "
            f"process{'es' if processes > 1 else ''}: use a multiple of {unit} ({_nearest_multiples(batch, unit)})"
        )


def parse_ramp(text: str) -> tuple[int, int, int]:
    """'start,end,over_samples' -> three positive ints. Raises ConfigError (one line)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        start, end, over = (int(part) for part in parts)
    except ValueError:
        raise ConfigError(f"batch ramp {text!r} is not start,end,over_samples (three integers, e.g. 32,256,100000)") from None
    for name, value in (("start", start), ("end", end), ("over_samples", over)):
        check_positive_int(f"batch ramp {name}", value)
    if end < start:
        raise ConfigError(f"batch ramp {text!r} goes down ({start} -> {end}): a ramp grows; use a schedule to shrink")
    return start, end, over


class BatchSchedule:
    """The effective batch of each window: a step schedule, a linear ramp, or noise-driven growth.

    Build with `steps(...)`, `ramp(...)` or `noise(...)`; then `bind(micro, processes)` before use.
    `batch` is the current effective batch in samples.
    """

    def __init__(self, kind: str, *, points: tuple[tuple[int, int], ...] = (), unit_name: str = "samples",
                 start: int = 0, end: int = 0, over: int = 0, minimum: int = 0, maximum: int = 0,
                 cooldown: int = 0, growth: str = "power_of_two"):
        self.kind = kind
        self.points, self.unit_name = points, unit_name
        self.start, self.end, self.over = start, end, over
        self.minimum, self.maximum, self.cooldown, self.growth = minimum, maximum, cooldown, growth
        self.unit = 1  # micro x processes, set by bind()
        self.batch = self.start_batch
        self.last_change_step = 0

    # -- construction and validation -------------------------------------------------------------

    @classmethod
    def steps(cls, mapping: Mapping[Any, Any], unit_name: str = "samples") -> BatchSchedule:
        """From {seen: batch}: keys in `unit_name` (samples or tokens), strictly increasing as written,
        the first 0. Raises ConfigError (one line)."""
        if not mapping:
            raise ConfigError("accumulation schedule is empty: give e.g. {0: 32, 20000: 64}")
        points, previous = [], None
        for key, batch in mapping.items():
            seen = check_positive_int(f"accumulation schedule key {key!r}", key) if key != 0 else 0
            check_positive_int(f"accumulation schedule batch at {key!r}", batch)
            if previous is not None and seen <= previous:
                raise ConfigError(f"accumulation schedule keys must increase: {seen} comes after {previous}; "
                                  f"write them in order of {unit_name} seen")
            points.append((seen, batch))
            previous = seen
        if points[0][0] != 0:
            raise ConfigError(f"accumulation schedule starts at {points[0][0]} {unit_name}: add the batch at 0 "
                              f"(e.g. {{0: {points[0][1]}, {points[0][0]}: ...}})")
        return cls("steps", points=tuple(points), unit_name=unit_name)

    @classmethod
    def ramp(cls, start: int, end: int, over_samples: int) -> BatchSchedule:
        return cls("ramp", start=start, end=end, over=over_samples)

    @classmethod
    def noise(cls, minimum: int, maximum: int, cooldown: int = 20, growth: str = "power_of_two") -> BatchSchedule:
        """Noise-driven growth from `minimum` up to `maximum`. Raises ConfigError (one line)."""
        check_positive_int("adaptive batch minimum", minimum)
        check_positive_int("adaptive batch maximum", maximum)
        if maximum < minimum:
            raise ConfigError(f"adaptive batch maximum {maximum} is below the minimum {minimum}: raise "
                              "adaptive_batch_max")
        if cooldown < 0:
            raise ConfigError(f"adaptive batch cooldown {cooldown} must be >= 0 optimizer steps")
        if growth not in ("power_of_two", "multiple"):
            raise ConfigError(f"adaptive batch growth {growth!r}: use power_of_two or multiple")
        return cls("noise", minimum=minimum, maximum=maximum, cooldown=cooldown, growth=growth)

    @property
    def start_batch(self) -> int:
        """The effective batch of the first window."""
        return {"steps": lambda: self.points[0][1], "ramp": lambda: self.start,
                "noise": lambda: self.minimum}[self.kind]()

    def bind(self, micro_batch_size: int, num_processes: int) -> BatchSchedule:
        """Check every batch the schedule names against the split unit micro x processes.
        Returns self. Raises ConfigError naming the batch and the nearest valid ones."""
        unit = micro_batch_size * num_processes
        named = {"steps": [(f"accumulation schedule batch at {seen} {self.unit_name}", b) for seen, b in self.points],
                 "ramp": [("batch ramp start", self.start), ("batch ramp end", self.end)],
                 "noise": [("adaptive batch minimum", self.minimum), ("adaptive batch maximum", self.maximum)]}
        for what, batch in named[self.kind]:
            _check_batch(what, batch, unit, micro_batch_size, num_processes)
        self.unit = unit
        return self

    # -- deciding ----------------------------------------------------------------------------------

    def batch_at(self, samples_seen: int, tokens_seen: int = 0) -> int:
        """The scheduled batch at this point (steps and ramp; noise: the current batch)."""
        if self.kind == "steps":
            seen = tokens_seen if self.unit_name == "tokens" else samples_seen
            return [batch for key, batch in self.points if key <= seen][-1]
        if self.kind == "ramp":
            exact = self.start + (self.end - self.start) * min(1.0, samples_seen / self.over)
            rounded = math.floor(exact / self.unit + 0.5) * self.unit
            return min(self.end, max(self.start, rounded))
        return self.batch

    def _noise_target(self, progress: Progress) -> tuple[int, str] | None:
        if progress.b_simple is None or not math.isfinite(progress.b_simple) or progress.b_simple <= 0:
            return None
        if progress.optimizer_step - self.last_change_step < self.cooldown:
            return None
        wanted = progress.b_simple / progress.items_per_sample  # in samples
        if self.growth == "power_of_two":
            new = self.batch
            while new * 2 <= min(wanted, self.maximum):
                new *= 2
        else:
            new = min(self.maximum, math.floor(wanted / self.unit) * self.unit)
        if new <= self.batch:
            return None
        return new, f"noise scale: smoothed B_simple {wanted:.4g} samples"

    def decide(self, progress: Progress) -> Change | None:
        """After a window: the batch for the next window if it changes (and adopt it), else None."""
        if self.kind == "noise":
            found = self._noise_target(progress)
            if found is None:
                return None
            new, reason = found
        else:
            new = self.batch_at(progress.samples_seen, progress.tokens_seen)
            if new == self.batch:
                return None
            seen = progress.tokens_seen if self.unit_name == "tokens" and self.kind == "steps" else progress.samples_seen
            unit_name = self.unit_name if self.kind == "steps" else "samples"
            reason = f"{'schedule' if self.kind == 'steps' else 'ramp'}: {seen} {unit_name} seen"
        change = Change(self.batch, new, reason)
        self.batch, self.last_change_step = new, progress.optimizer_step
        return change

    def simulate(self, max_steps: int) -> int:
        """Samples seen after `max_steps` windows of a steps (samples) or ramp schedule, from the start.
        Raises ValueError for noise and token-keyed schedules, whose path depends on the run."""
        if self.kind == "noise" or (self.kind == "steps" and self.unit_name == "tokens"):
            raise ValueError("a noise-driven or token-keyed schedule cannot be simulated ahead")
        samples, batch = 0, self.start_batch
        for _ in range(max_steps):
            samples += batch
            batch = self.batch_at(samples)
        return samples

    # -- reporting and state -----------------------------------------------------------------------

    def describe(self) -> str:
        """One line for the banner."""
        if self.kind == "steps":
            steps = ", ".join(f"{b} from {seen}" for seen, b in self.points)
            return f"Batch schedule: effective batch {steps} {self.unit_name} seen"
        if self.kind == "ramp":
            return (f"Batch schedule: ramp {self.start} -> {self.end} over {self.over} samples "
                    f"(in steps of {self.unit})")
        step = "doubling" if self.growth == "power_of_two" else f"in multiples of {self.unit}"
        return (f"Batch schedule: follows the noise scale B_simple from {self.minimum} up to {self.maximum}, "
                f"growing only ({step}), at most once per {self.cooldown} optimizer steps")

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "kind": self.kind, "batch": self.batch,
                "last_change_step": self.last_change_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the current batch; raises ConfigError when the state is of another kind of schedule."""
        if state.get("kind") != self.kind or state.get("version") != _STATE_VERSION:
            raise ConfigError(f"the checkpoint's batch schedule is {state.get('kind')!r}, now {self.kind!r}: "
                              "resume with the run's own schedule")
        self.batch = int(state["batch"])
        self.last_change_step = int(state["last_change_step"])


def schedule_from_config(config: Any) -> BatchSchedule | None:
    """The schedule a RunConfig asks for (at most one of accumulation_schedule, batch_ramp,
    adaptive_batch), unbound; None when none. Raises ConfigError (one line)."""
    asked = [name for name, on in (("accumulation_schedule", config.accumulation_schedule is not None),
                                   ("batch_ramp", config.batch_ramp is not None),
                                   ("adaptive_batch", config.adaptive_batch != "none")) if on]
    if len(asked) > 1:
        raise ConfigError(f"{' and '.join(asked)} both set the batch: choose one")
    if not asked:
        return None
    if config.accumulation_schedule is not None:
        return BatchSchedule.steps(config.accumulation_schedule, config.schedule_unit)
    if config.batch_ramp is not None:
        return BatchSchedule.ramp(*parse_ramp(config.batch_ramp))
    minimum = config.adaptive_batch_min or config.batch_size
    maximum = config.adaptive_batch_max or minimum * 8
    return BatchSchedule.noise(minimum, maximum, config.adaptive_batch_cooldown, config.adaptive_batch_growth)


# ----------------------------------------------------------------------------- LR in samples


def lr_shape(name: str, samples: float, warmup_samples: float, total_samples: float) -> float:
    """The LR multiplier at `samples` seen: transformers' constant_with_warmup / linear / cosine
    formulas with optimizer steps replaced by samples (identical for a fixed batch)."""
    if samples < warmup_samples:
        return samples / max(1.0, warmup_samples)
    if name == "constant":
        return 1.0
    progress = (samples - warmup_samples) / max(1.0, total_samples - warmup_samples)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown LR schedule {name!r}: use constant, linear or cosine")


class SampleLR:
    """LR = base_lr x rule(batch / base_batch) x shape(samples seen): an LR schedule in samples.

    Optimizer steps do not move it (`step()` does nothing, so a loop that steps a scheduler per
    optimizer step can hold it); `advance(samples_seen, batch)` sets the LR for the next window.
    state_dict() / load_state_dict() hold the position, so resume applies the same LR.
    """

    def __init__(self, optimizer: Any, base_lr: float, base_batch: int, rule: str, shape: str,
                 warmup_samples: int, total_samples: int, batch: int):
        self.optimizer = optimizer
        self.base_lr, self.base_batch, self.rule, self.shape = base_lr, base_batch, rule, shape
        self.warmup_samples, self.total_samples = warmup_samples, total_samples
        self.samples_seen, self.batch = 0, batch
        self.advance(0, batch)

    def lr_at(self, samples_seen: int, batch: int) -> float:
        scaled = scale_lr(self.base_lr, self.base_batch, batch, self.rule).lr
        return scaled * lr_shape(self.shape, samples_seen, self.warmup_samples, self.total_samples)

    def advance(self, samples_seen: int, batch: int) -> float:
        """Set the LR for training on from `samples_seen` at effective batch `batch`; return it."""
        self.samples_seen, self.batch = int(samples_seen), int(batch)
        lr = self.lr_at(self.samples_seen, self.batch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        """Nothing: this schedule moves with samples (`advance`), not optimizer steps."""

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; a step-based scheduler's state (a fixed-batch checkpoint continued
        under a schedule) is ignored: the caller advances to the checkpoint's samples instead."""
        if "samples_seen" in state:
            self.advance(int(state["samples_seen"]), int(state["batch"]))
