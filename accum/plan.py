"""Plan arithmetic: a target (effective) batch -> micro-batch x accumulation steps x processes, exactly.

Pure functions: no device, no model. Errors are `ConfigError`s with one line naming the value,
what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from accum.errors import ConfigError, check_positive_int

logger = logging.getLogger(__name__)


CUTS = ("samples", "balanced", "tokens")


@dataclass(frozen=True)
class Plan:
    """How one optimizer step's batch is split. Sizes are in samples, per process unless named.

    cut "samples": every micro-batch holds `micro_batch_size` samples (it divides the per-process
    share). "balanced": `accumulation_steps` nearly equal micro-batches of `smallest_micro_batch` to
    `micro_batch_size` samples (a share the largest fitting size does not divide still uses nearly
    that size). "tokens": micro-batches are cut by length, each at most `micro_batch_tokens` tokens
    counted with its own padding; the sample figures are then those of a window of the longest
    sequences (a window of shorter ones takes fewer micro-batches).
    """

    micro_batch_size: int
    accumulation_steps: int
    num_processes: int
    effective_batch_size: int
    target_batch_size: int
    source: str = "probe"  # probe | cache | given | derived | estimate
    probes: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    cache_key: str | None = field(default=None, compare=False)  # where a probed plan is cached
    verified_steps: int = field(default=0, compare=False)  # steps trained back to back in a fresh process
    smallest_micro_batch: int | None = None  # balanced and token plans: the smallest part
    micro_batch_tokens: int | None = None  # token plans: the budget of one micro-batch, padding counted
    cut: str = "samples"
    sequence_length: int | None = None  # token plans: the longest sequence, which the sample figures assume

    @property
    def smallest(self) -> int:
        return self.smallest_micro_batch if self.smallest_micro_batch is not None else self.micro_batch_size

    def layout(self) -> str:
        """`16 micro x 16 accum`, or `11 micro-batches of 93-94` when the parts differ."""
        if self.smallest == self.micro_batch_size:
            return f"{self.micro_batch_size} micro x {self.accumulation_steps} accum"
        return f"{self.accumulation_steps} micro-batches of {self.smallest}-{self.micro_batch_size}"

    def banner(self) -> str:
        """`Effective batch size: 256 = 16 micro x 16 accum x 1 process`, with the token budget of a
        token plan: `... x 1 process (token budget 49,664; at the longest sequences)`."""
        processes = "process" if self.num_processes == 1 else "processes"
        line = f"Effective batch size: {self.effective_batch_size} = {self.layout()} x {self.num_processes} {processes}"
        if self.micro_batch_tokens is not None:
            line += f" (token budget {self.micro_batch_tokens:,}; the split shown is at the longest sequences)"
        return line

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (probes as plain dicts)."""
        data = asdict(self)
        data["probes"] = [dict(probe) for probe in self.probes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The inverse of `to_dict`. Raises ConfigError on a dict that is not a consistent plan (sizes
        that are not positive whole numbers, or that do not multiply out)."""
        if not isinstance(data, dict):
            raise ConfigError(f"plan {data!r:.200} is not a mapping")
        for key in ("micro_batch_size", "accumulation_steps", "num_processes", "effective_batch_size",
                    "target_batch_size"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"plan {key} {value!r} is not a positive whole number")
        try:
            plan = cls(
                micro_batch_size=int(data["micro_batch_size"]),
                accumulation_steps=int(data["accumulation_steps"]),
                num_processes=int(data["num_processes"]),
                effective_batch_size=int(data["effective_batch_size"]),
                target_batch_size=int(data["target_batch_size"]),
                source=str(data.get("source", "probe")),
                probes=tuple(dict(probe) for probe in data.get("probes", ())),
                cache_key=data.get("cache_key"),
                verified_steps=int(data.get("verified_steps") or 0),
                smallest_micro_batch=None if data.get("smallest_micro_batch") is None else int(data["smallest_micro_batch"]),
                micro_batch_tokens=None if data.get("micro_batch_tokens") is None else int(data["micro_batch_tokens"]),
                cut=str(data.get("cut", "samples")),
                sequence_length=None if data.get("sequence_length") is None else int(data["sequence_length"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"plan {data!r:.200} is missing or has a bad field: {exc}") from None
        low = plan.smallest * plan.accumulation_steps * plan.num_processes
        high = plan.micro_batch_size * plan.accumulation_steps * plan.num_processes
        if not (plan.cut in CUTS and low <= plan.effective_batch_size <= high and 1 <= plan.smallest <= plan.micro_batch_size
                and plan.effective_batch_size % plan.num_processes == 0):
            raise ConfigError(f"plan is inconsistent: {plan.banner()} does not multiply out")
        return plan


def divisors(n: int) -> list[int]:
    """The divisors of n > 0, ascending, in O(sqrt(n)) steps (a batch of 2**40 stays instant)."""
    check_positive_int("n", n)
    small, large, d = [], [], 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def nearest_valid_targets(target: int, multiple_of: int) -> list[int]:
    """The multiples of `multiple_of` closest to `target` from below (if positive) and above."""
    below = (target // multiple_of) * multiple_of
    above = below + multiple_of
    return [value for value in (below, above) if value > 0 and value != target]


def _split_per_process(target: int, num_processes: int, allow_rounding: bool, quiet: bool = False) -> tuple[int, int]:
    """Return (target, per-process batch), rounding the target only when allowed, with one line
    (unless `quiet`, for a caller that only checks ahead of `plan_batch`)."""
    if target < num_processes:
        raise ConfigError(
            f"batch size {target} is smaller than the {num_processes} processes: each needs at least one "
            f"sample per step; use `batch_size` {num_processes} or more, or fewer processes"
        )
    if target % num_processes == 0:
        return target, target // num_processes
    nearest = nearest_valid_targets(target, num_processes)
    if not allow_rounding:
        raise ConfigError(
            f"batch size {target} cannot be split evenly over {num_processes} processes: use "
            f"{' or '.join(map(str, nearest))}, or allow rounding (`allow_batch_rounding`)"
        )
    rounded = min(nearest, key=lambda value: (abs(value - target), value))
    if not quiet:
        message = f"batch size {target} rounded to {rounded}: it must be a multiple of {num_processes} processes"
        logger.warning(message)
        warnings.warn(message, stacklevel=3)
    return rounded, rounded // num_processes


def plan_batch(
    target_batch_size: int,
    max_micro_batch: int,
    num_processes: int = 1,
    allow_rounding: bool = False,
    source: str = "probe",
    probes: tuple | list = (),
    *,
    cut: str = "samples",
    token_length: int | None = None,
) -> Plan:
    """Split `target_batch_size` so that no micro-batch holds more than `max_micro_batch` samples.

    cut "samples": the largest micro-batch <= `max_micro_batch` that divides the per-process share
    exactly, and the accumulation steps that make up the rest. "balanced": as few micro-batches as
    `max_micro_batch` allows, of nearly equal sizes (1,024 with 97 fitting: eleven of 93 or 94, not
    sixteen of 64). "tokens": balanced at the longest sequences (`token_length` tokens each) and a
    token budget per micro-batch, by which the windows are cut: the largest equal part x `token_length`.

    Returns a Plan whose effective batch equals the target (or the rounded target, when the target
    is not a multiple of `num_processes` and `allow_rounding` is set; a warning says so).
    Raises ConfigError for non-positive sizes, a target smaller than the number of processes,
    or a target not divisible by it without `allow_rounding` (naming the nearest valid targets).
    """
    check_positive_int("batch size", target_batch_size)
    check_positive_int("max micro-batch", max_micro_batch)
    check_positive_int("number of processes", num_processes)
    if cut not in CUTS:
        raise ConfigError(f"cut {cut!r} is unknown: use one of {', '.join(CUTS)}")
    if (cut == "tokens") != (token_length is not None):
        raise ConfigError("a token plan needs `token_length` (the longest sequence), and only a token plan takes it")
    target, per_process = _split_per_process(target_batch_size, num_processes, allow_rounding)
    common = dict(num_processes=num_processes, effective_batch_size=target, target_batch_size=target_batch_size,
                  source=source, probes=tuple(dict(probe) for probe in probes), cut=cut)
    if cut != "samples":
        parts = -(-per_process // min(max_micro_batch, per_process))
        largest = -(-per_process // parts)
        # the budget of the largest equal part, not of the largest fit: at the longest sequences a
        # larger budget would only leave a smaller last part, and the plan stays the same while the
        # measured largest fit moves by a sample or two from run to run
        tokens = None if token_length is None else check_positive_int("token length", token_length) * largest
        return Plan(micro_batch_size=largest, accumulation_steps=parts,
                    smallest_micro_batch=per_process // parts, micro_batch_tokens=tokens, sequence_length=token_length,
                    **common)
    micro = largest_divisor_at_most(per_process, max_micro_batch)
    if micro * 2 <= min(max_micro_batch, per_process):
        better = nearest_valid_targets(target, min(max_micro_batch, per_process) * num_processes)
        logger.warning(
            "batch size %d allows micro-batch %d only (%d would fit): batch size %s would use the full micro-batch",
            target, micro, max_micro_batch, " or ".join(map(str, better)),
        )
    return Plan(micro_batch_size=micro, accumulation_steps=per_process // micro, **common)


def largest_divisor_at_most(n: int, bound: int) -> int:
    """The largest divisor of `n` that is <= `bound` (at least 1), in O(sqrt(n)) steps."""
    check_positive_int("n", n)
    check_positive_int("bound", bound)
    best, d = 1, 1
    while d * d <= n:
        if n % d == 0:
            for candidate in (d, n // d):
                if candidate <= bound and candidate > best:
                    best = candidate
        d += 1
    return best


def replan(plan: Plan, target_batch_size: int | None = None, max_micro_batch: int | None = None,
           micro_batch_tokens: int | None = None) -> Plan:
    """`plan` for another target (a batch schedule) or a smaller limit (OOM recovery, memory
    pressure), split the way `plan` is: fixed, balanced or by tokens. Keeps the plan's source."""
    target = plan.target_batch_size if target_batch_size is None else target_batch_size
    micro = plan.micro_batch_size if max_micro_batch is None else max_micro_batch
    if plan.cut != "tokens":
        new = plan_batch(target, micro, plan.num_processes, allow_rounding=True, source=plan.source, cut=plan.cut)
        return dataclasses.replace(new, cache_key=plan.cache_key)
    length = plan.sequence_length
    tokens = plan.micro_batch_tokens if micro_batch_tokens is None else micro_batch_tokens
    samples = max(1, tokens // length if max_micro_batch is None else min(max_micro_batch, tokens // length))
    new = plan_batch(target, samples, plan.num_processes, allow_rounding=True, source=plan.source, cut="tokens",
                     token_length=length)
    return dataclasses.replace(new, micro_batch_tokens=tokens, cache_key=plan.cache_key)


def plan_from_accumulation(micro_batch_size: int, accumulation_steps: int, num_processes: int = 1) -> Plan:
    """A plan from a given micro-batch and accumulation (k x a base batch): the effective batch follows.

    Raises ConfigError for non-positive values.
    """
    check_positive_int("micro-batch size", micro_batch_size)
    check_positive_int("accumulation steps", accumulation_steps)
    check_positive_int("number of processes", num_processes)
    effective = micro_batch_size * accumulation_steps * num_processes
    return Plan(micro_batch_size, accumulation_steps, num_processes, effective, effective, source="given")


def _as_count(name: str, value: int | str | None) -> int | None:
    """None for 'auto'/None, else a positive int (ConfigError otherwise)."""
    if value is None or value == "auto":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive integer or 'auto' (got {value!r})") from None
    if number != value and str(number) != str(value):
        raise ConfigError(f"{name} must be a whole number (got {value!r})")
    check_positive_int(name, number)
    return number


def resolve_batch(
    batch_size: int,
    micro_batch_size: int | str | None,
    grad_accum_steps: int | str | None,
    num_processes: int,
    cli_keys: set[str] | frozenset[str] = frozenset(),
) -> tuple[int, int | None, int | None, str | None]:
    """Any two of batch size, micro-batch and accumulation determine the third.

    Returns (target batch, micro-batch or None, accumulation steps or None, note or None); None means
    'to be planned' (the planner probes the micro-batch). The note is one line saying which given
    value was overridden and why. Values named in `cli_keys` (batch_size, micro_batch_size,
    grad_accum_steps) came from the command line and win over the config file.
    Raises ConfigError when the three disagree and all come from the same source, or a split is
    not exact.
    """
    check_positive_int("batch size", batch_size)
    check_positive_int("number of processes", num_processes)
    micro = _as_count("micro-batch size", micro_batch_size)
    accum = _as_count("accumulation steps", grad_accum_steps)
    on_cli = {key for key in ("batch_size", "micro_batch_size", "grad_accum_steps") if key in cli_keys}

    if micro is not None and accum is not None:
        implied = micro * accum * num_processes
        if implied == batch_size:
            return batch_size, micro, accum, None
        sums = f"{micro} micro x {accum} accum x {num_processes} processes = {implied}"
        pair = {"micro_batch_size", "grad_accum_steps"}
        if pair <= on_cli and "batch_size" not in on_cli:
            return implied, micro, accum, f"batch size {batch_size} from the config overridden: {sums}"
        if "batch_size" in on_cli and not pair <= on_cli:
            # The command line's batch wins; keep the micro-batch, re-derive the accumulation.
            derived_from = "accumulation" if "grad_accum_steps" not in on_cli else "micro-batch"
            keep_micro = derived_from == "accumulation"
            target, micro2, accum2 = _derive(batch_size, micro if keep_micro else None,
                                             None if keep_micro else accum, num_processes)
            old = accum if keep_micro else micro
            new = accum2 if keep_micro else micro2
            return target, micro2, accum2, (
                f"{derived_from} {old} from the config overridden by {new}: `batch_size` {batch_size} was given"
            )
        raise ConfigError(
            f"batch size {batch_size} disagrees with {sums}: give any two of `batch_size`, "
            f"`micro_batch_size` and `grad_accum_steps`, or values that multiply out"
        )
    target, micro2, accum2 = _derive(batch_size, micro, accum, num_processes)
    return target, micro2, accum2, None


def per_process_limit(target_batch_size: int, num_processes: int, allow_rounding: bool = False) -> int:
    """The per-process share of the target (after rounding, if allowed): the largest micro-batch
    worth probing. Raises ConfigError as `plan_batch` would, before any probing is spent."""
    check_positive_int("batch size", target_batch_size)
    check_positive_int("number of processes", num_processes)
    return _split_per_process(target_batch_size, num_processes, allow_rounding, quiet=True)[1]


def _derive(batch_size: int, micro: int | None, accum: int | None, num_processes: int) -> tuple[int, int | None, int | None]:
    """Derive the missing one of micro/accum from the batch, exactly, or raise ConfigError."""
    if micro is None and accum is None:
        _split_per_process(batch_size, num_processes, allow_rounding=False)
        return batch_size, None, None
    given_name, given = ("micro-batch size", micro) if micro is not None else ("accumulation steps", accum)
    step = given * num_processes
    if batch_size % step:
        nearest = nearest_valid_targets(batch_size, step)
        raise ConfigError(
            f"batch size {batch_size} is not a multiple of {given_name} {given} x {num_processes} processes: "
            f"use `batch_size` {' or '.join(map(str, nearest))}"
        )
    other = batch_size // step
    return (batch_size, micro, other) if micro is not None else (batch_size, other, accum)
