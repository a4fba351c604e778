"""Memory estimates for a training step without running it: for when probing is impossible.

Two methods, both pure (no device memory is touched):

- analytic: bytes per parameter for weights, gradients and optimizer state (by optimizer
  and precision), plus activations per sample and token, times a safety factor. Instant,
  rough; good for a first look and for models that cannot be traced.
- traced: the model is built under `FakeTensorMode` and one steady-state training step
  (forward, backward, `optimizer.step()`) runs under `MemTracker`, which adds up the
  storages that are alive at every moment. Nothing is allocated, so a CPU plans for a GPU
  it does not have. Measured on this machine: GPT-2 small at 4 x 512, fp32 AdamW, 5.9 GiB
  traced in about 4 s; for a small GPT-2 the trace matches the real growth of resident
  memory over one step (tests/test_estimate.py).

Neither counts what the device runtime keeps for itself (the CUDA context, cuBLAS
workspaces, allocator fragmentation): leave a margin (`safety_margin`) for it.

`max_micro_batch_for` searches either estimate for the largest micro-batch that fits a
memory budget, and `estimate_main` is `python -m accum estimate`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from accum.errors import ConfigError, check_positive_int, first_line

OPTIMIZERS = ("adamw", "adamw_8bit", "lion_8bit", "sgd")
PRECISIONS = ("no", "fp16", "bf16")
TASKS = ("clm", "classification")
METHODS = ("traced", "analytic")

# bitsandbytes keeps 8-bit state (plus one fp32 absmax per block of 256) for tensors of at
# least 4096 elements, and fp32 state for smaller ones. Measured on bitsandbytes 0.50.
_BNB_BLOCK = 256
_BNB_MIN_8BIT_SIZE = 4096
_OPTIMIZER_STATES = {"adamw": 2, "adamw_8bit": 2, "lion_8bit": 1, "sgd": 0}

# Optimizer state in bytes per parameter (large tensors), as `estimate_analytic` counts it.
# SGD is counted without momentum (the run config's default `momentum: 0` keeps no buffer).
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,  # exp_avg + exp_avg_sq in fp32
    "adamw_8bit": 2 * (1 + 4 / _BNB_BLOCK),  # two uint8 states + fp32 absmax per block
    "lion_8bit": 1 + 4 / _BNB_BLOCK,  # one uint8 state + fp32 absmax per block
    "sgd": 0.0,
}

# Activations kept for backward, per token and hidden unit of one transformer layer, in
# bytes at 16-bit precision: 34 (Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models", with fused attention that keeps no
# seq x seq scores, as SDPA/flash attention on a GPU). fp32 doubles all but the 1-byte
# dropout masks (2 of the 34).
_ACT_BYTES_PER_HIDDEN = {"no": 66, "fp16": 34, "bf16": 34}
# The analytic estimate's own allowance for what its formula leaves out (allocator rounding, the
# temporaries of ops it does not model): its total is the formula's peak times this. The traced
# estimate counts every storage and needs none (1.0).
ANALYTIC_SAFETY_FACTOR = 1.2
# A language-model head keeps about three vocab-wide fp32 rows per token: the logits, their
# log-softmax in the loss, and the gradient of the logits.
_LOGIT_COPIES = 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step, in bytes, split by what holds it.

    `weights`, `gradients`, `optimizer_state` and `activations` (activations plus
    temporaries) are the parts at the peak; `peak` is their sum and `total` is
    `peak * safety_factor`, rounded up: the number to compare with a budget.
    `gradients_total` is every gradient once backward is done, which can be far more than
    `gradients` when the peak comes early in backward (a large vocabulary's logits).
    `held_between_steps` is what stays allocated between steps (weights, buffers,
    optimizer state), so `peak - held_between_steps` is how much one step grows memory.
    """

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    held_between_steps: int
    gradients_total: int = 0
    safety_factor: float = 1.0
    method: str = "analytic"
    micro_batch_size: int = 0
    seq_len: int = 0
    seconds: float = 0.0

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations

    @property
    def total(self) -> int:
        return math.ceil(self.peak * self.safety_factor)

    @property
    def step_growth(self) -> int:
        """Bytes one step adds on top of what is held between steps (before the safety factor)."""
        return self.peak - self.held_between_steps

    def as_dict(self) -> dict[str, Any]:
        """All fields plus `peak`, `total` and `step_growth`, JSON-ready (bytes, seconds)."""
        return {**asdict(self), "peak": self.peak, "total": self.total, "step_growth": self.step_growth}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not known: choose one of {', '.join(choices)}")


def estimate_analytic(
    num_params: int,
    micro_batch_size: int,
    seq_len: int,
    *,
    optimizer: str = "adamw",
    precision: str = "no",
    hidden_size: int,
    num_layers: int,
    vocab_size: int = 0,
    activation_bytes_per_token: float | None = None,
    gradient_checkpointing: bool = False,
    safety_factor: float = ANALYTIC_SAFETY_FACTOR,
) -> MemoryEstimate:
    """Estimate the peak bytes of one training step from the model's sizes alone.

    weights   = 4 * P (fp32 master weights), + 2 * P under fp16/bf16 autocast (the half
                copies it caches for the forward pass)
    gradients = 4 * P (gradients take the parameters' dtype, fp32)
    optimizer = P * OPTIMIZER_STATE_BYTES[optimizer] (AdamW 8, AdamW8bit ~2, Lion8bit ~1, SGD 0)
    activations = micro_batch_size * seq_len * activation_bytes_per_token, where by default
        per token = num_layers * hidden_size * 66 bytes in fp32 (34 in fp16/bf16), after
        Korthikanti et al. 2022 with fused attention, + 3 * vocab_size * 4 bytes for a
        language-model head's logits; with gradient checkpointing each layer keeps only its
        input (hidden_size values per token) and one layer is recomputed at a time.
    total = (weights + gradients + optimizer + activations) * safety_factor (default
        ANALYTIC_SAFETY_FACTOR, 1.2: what the formula leaves out).

    Rough by design: models whose activation functions are composed of many small ops keep
    more (GPT-2's tanh-GELU: the trace finds about 2x the activations); use the traced
    estimate where the model can be built, or pass `activation_bytes_per_token`.
    Returns a MemoryEstimate (bytes). Raises ConfigError on a non-positive size, an unknown
    optimizer or precision.
    """
    for name, value in (("num_params", num_params), ("micro_batch_size", micro_batch_size), ("seq_len", seq_len),
                        ("hidden_size", hidden_size), ("num_layers", num_layers)):
        check_positive_int(name, value)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("precision", precision, PRECISIONS)
    if vocab_size < 0:
        raise ConfigError(f"vocab_size must be 0 (no language-model head) or positive (got {vocab_size!r})")
    if not safety_factor >= 1.0:
        raise ConfigError(f"safety_factor must be at least 1.0 (got {safety_factor!r})")

    weights = 4 * num_params + (2 * num_params if precision != "no" else 0)
    gradients = 4 * num_params
    optimizer_state = math.ceil(num_params * OPTIMIZER_STATE_BYTES[optimizer])
    if activation_bytes_per_token is None:
        per_hidden = _ACT_BYTES_PER_HIDDEN[precision]
        value_bytes = 4 if precision == "no" else 2
        if gradient_checkpointing:
            layers = num_layers * hidden_size * value_bytes + hidden_size * per_hidden
        else:
            layers = num_layers * hidden_size * per_hidden
        activation_bytes_per_token = layers + _LOGIT_COPIES * 4 * vocab_size
    elif activation_bytes_per_token < 0:
        raise ConfigError(f"activation_bytes_per_token must not be negative (got {activation_bytes_per_token!r})")
    activations = math.ceil(micro_batch_size * seq_len * activation_bytes_per_token)
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_state=optimizer_state,
        activations=activations,
        held_between_steps=4 * num_params + optimizer_state,
        gradients_total=gradients,
        safety_factor=safety_factor,
        method="analytic",
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
    )


# ---------------------------------------------------------------------------------------
# Traced estimate


ModelSource = Callable[[], torch.nn.Module] | Any  # a factory, a PretrainedConfig, or a path


def load_model_config(spec: str | os.PathLike[str]) -> Any:
    """A transformers config from a model directory, a config.json file or inline JSON (with a
    `model_type`). Raises ConfigError naming `model`."""
    from transformers import AutoConfig

    text, path = str(spec), Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"`model` directory {text!r} has no config.json: give a model directory or a config.json")
        try:
            return AutoConfig.from_pretrained(text)
        except (ValueError, OSError, KeyError) as exc:
            raise ConfigError(f"`model` {text!r}: cannot read its config: {first_line(exc)}") from None
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"`model` {text!r} is not a JSON config: {first_line(exc)}") from None
    elif text.lstrip().startswith("{"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"`model` {text!r} is not valid JSON: {first_line(exc)}") from None
    else:
        raise ConfigError(f"`model` {text!r} is neither a model directory, a config JSON file nor inline JSON")
    if not isinstance(values, dict) or "model_type" not in values:
        raise ConfigError(f"`model` {text!r}: a config needs a 'model_type' key, e.g. \"gpt2\"")
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"`model` {text!r}: not a transformers config: {first_line(exc)}") from None


# transformers' name of each task's loss (transformers.loss.loss_utils.LOSS_MAPPING)
LOSS_TYPES = {"clm": "ForCausalLM", "classification": "ForSequenceClassification"}


def set_loss_type(model: torch.nn.Module, task: str) -> torch.nn.Module:
    """Name the model's loss for transformers. It guesses the name from the class (GPT2LMHeadModel has
    none of its patterns), and without one warns `loss_type=None ... unrecognized` at the first loss it
    computes. Returns the model."""
    if hasattr(model, "loss_type"):
        model.loss_type = LOSS_TYPES[task]
    return model


def _model_from_config(config: Any, task: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "clm":
        return set_loss_type(AutoModelForCausalLM.from_config(config), task)
    if getattr(config, "pad_token_id", None) is None:
        # Heads that pool the last non-padding token refuse batches > 1 without a pad id.
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    return set_loss_type(AutoModelForSequenceClassification.from_config(config), task)


def _default_batch(model: torch.nn.Module, micro_batch_size: int, seq_len: int, task: str) -> dict[str, torch.Tensor]:
    """Token ids and labels for a transformers model. No attention mask: all-ones is the
    same memory, and checking a mask's values is data-dependent, which a trace cannot do."""
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        raise ConfigError("the model has no config.vocab_size: pass make_batch=(micro_batch_size, seq_len) -> inputs")
    input_ids = torch.randint(0, vocab_size, (micro_batch_size, seq_len))
    if task == "clm":
        return {"input_ids": input_ids, "labels": input_ids}
    num_labels = getattr(config, "num_labels", 2)
    return {"input_ids": input_ids, "labels": torch.randint(0, num_labels, (micro_batch_size,))}


class _Bnb8bitStandIn(torch.optim.Optimizer):
    """Holds the state bitsandbytes' 8-bit optimizers hold, so that a trace can count it
    (their CPU kernels read tensor values and cannot run on fake tensors)."""

    def __init__(self, params: Any, num_states: int, lr: float = 1e-4) -> None:
        super().__init__(params, {"lr": lr})
        self.num_states = num_states

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for index in range(1, self.num_states + 1):
                        if param.numel() >= _BNB_MIN_8BIT_SIZE:
                            state[f"state{index}"] = torch.zeros_like(param, dtype=torch.uint8)
                            blocks = math.ceil(param.numel() / _BNB_BLOCK)
                            state[f"absmax{index}"] = torch.zeros(blocks, dtype=torch.float32)
                        else:
                            state[f"state{index}"] = torch.zeros_like(param, dtype=torch.float32)
                param.add_(param.grad, alpha=-group["lr"])


def _enable_checkpointing(model: torch.nn.Module) -> None:
    # transformers 5.23 renamed gradient_checkpointing_enable (deprecated there, the only name in 5.17).
    checkpoint_kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    else:
        raise ConfigError("gradient checkpointing needs a transformers model (one with gradient_checkpointing_enable)")


def _make_optimizer(params: list[torch.nn.Parameter], optimizer: str) -> torch.optim.Optimizer:
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    return _Bnb8bitStandIn(params, num_states=_OPTIMIZER_STATES[optimizer])


def _autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def _loss_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 0 else output.float().mean()
    loss = output["loss"] if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ConfigError("the model returned no loss: give labels in make_batch, or return a loss tensor")
    return loss


def _snapshot_bytes(snapshot: dict[Any, dict[Any, int]]) -> dict[str, int]:
    """MemTracker's per-device snapshot, summed over devices and keyed by category name."""
    parts: dict[str, int] = {}
    for device_snapshot in snapshot.values():
        for kind, value in device_snapshot.items():
            name = getattr(kind, "value", kind)
            parts[name] = parts.get(name, 0) + int(value)
    return parts


@dataclass
class Tracer:
    """A model and optimizer built once under FakeTensorMode, traced at any batch shape.

    Building the model is a good part of a trace's cost, so a search over micro-batch sizes
    reuses one Tracer. `trace(micro_batch_size, seq_len)` returns a MemoryEstimate.
    """

    model_source: Any
    task: str = "clm"
    optimizer: str = "adamw"
    precision: str = "no"
    gradient_checkpointing: bool = False
    make_batch: Callable[[int, int], Mapping[str, torch.Tensor]] | None = None
    safety_factor: float = 1.0
    build_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        _check_choice("task", self.task, TASKS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("precision", self.precision, PRECISIONS)
        if not self.safety_factor >= 1.0:
            raise ConfigError(f"safety_factor must be at least 1.0 (got {self.safety_factor!r})")
        if isinstance(self.model_source, (str, os.PathLike)):
            self.model_source = load_model_config(self.model_source)
        started = time.perf_counter()
        self._fake_mode = FakeTensorMode()
        with self._fake_mode:
            if callable(self.model_source) and not hasattr(self.model_source, "to_dict"):
                model = self.model_source()
            else:
                try:
                    model = _model_from_config(self.model_source, self.task)
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(f"cannot build a {self.task} model from this config: {first_line(exc)}") from None
            model.train()
            if self.gradient_checkpointing:
                _enable_checkpointing(model)
            params = [p for p in model.parameters() if p.requires_grad]
            self._optimizer = _make_optimizer(params, self.optimizer)
            # One step on zero gradients creates the optimizer state, so that the traced step
            # is a steady-state one (AdamW allocates its state at the first step).
            for param in params:
                param.grad = torch.zeros_like(param)
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        self._model = model
        self.num_params = sum(p.numel() for p in model.parameters())
        # each trainable parameter's gradient takes its dtype: what backward has allocated when it is done
        self.gradient_bytes = sum(p.numel() * p.element_size() for p in params)
        self.build_seconds = time.perf_counter() - started

    def trace(self, micro_batch_size: int, seq_len: int) -> MemoryEstimate:
        """Peak bytes of one steady-state training step at this shape. Raises ConfigError
        when the model cannot run on fake tensors (use the analytic estimate then)."""
        from torch.distributed._tools.mem_tracker import MemTracker

        check_positive_int("micro_batch_size", micro_batch_size)
        check_positive_int("seq_len", seq_len)
        started = time.perf_counter()
        with self._fake_mode:
            if self.make_batch is not None:
                batch = dict(self.make_batch(micro_batch_size, seq_len))
            else:
                batch = _default_batch(self._model, micro_batch_size, seq_len, self.task)
            tracker = MemTracker()
            tracker.track_external(self._model, self._optimizer, *batch.values())
            held = _snapshot_bytes(tracker.get_tracker_snapshot("current"))
            try:
                # MemTracker warns once per checkpointed module whose weakref died in backward.
                with tracker, warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Module is None", category=UserWarning)
                    with _autocast(self.precision):
                        loss = _loss_of(self._model(**batch))
                    loss.backward()
                    self._optimizer.step()
                    self._optimizer.zero_grad(set_to_none=True)
            except ConfigError:
                raise
            except Exception as exc:  # a data-dependent op, an op without a fake kernel
                self._optimizer.zero_grad(set_to_none=True)
                raise ConfigError(
                    f"cannot trace this model on fake tensors ({type(exc).__name__}: {first_line(exc)}): "
                    "use the analytic estimate (`method` analytic)"
                ) from None
            del loss, batch
        peak = _snapshot_bytes(tracker.get_tracker_snapshot("peak"))
        weights = peak.get("Parameter", 0) + peak.get("Buffer", 0)
        inputs = held.get("Other", 0)
        return MemoryEstimate(
            weights=weights,
            gradients=peak.get("Gradient", 0),
            optimizer_state=peak.get("Optstate", 0),
            activations=peak.get("Activation", 0) + peak.get("Temp", 0) + peak.get("Other", 0),
            # The batch is counted at the peak but is not held between steps.
            held_between_steps=held.get("Total", 0) - inputs,
            gradients_total=self.gradient_bytes,
            safety_factor=self.safety_factor,
            method="traced",
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            seconds=time.perf_counter() - started,
        )


def estimate_traced(
    model_factory_or_config: Any,
    micro_batch_size: int,
    seq_len: int,
    *,
    task: str = "clm",
    optimizer: str = "adamw",
    precision: str = "no",
    gradient_checkpointing: bool = False,
    make_batch: Callable[[int, int], Mapping[str, torch.Tensor]] | None = None,
    safety_factor: float = 1.0,
) -> MemoryEstimate:
    """Trace one steady-state training step (forward, backward, optimizer.step) on fake
    tensors and return its peak memory as a MemoryEstimate (bytes; `.total` to compare).

    `model_factory_or_config`: a zero-argument callable returning an nn.Module (called under
    FakeTensorMode), a transformers config, or a path to a model directory or config.json.
    Inputs are random token ids of shape (micro_batch_size, seq_len) with labels for `task`,
    unless `make_batch(micro_batch_size, seq_len) -> dict of tensors` is given. Mixed
    precision is traced with CPU autocast; 8-bit optimizers with a stand-in holding
    bitsandbytes' state layout. Raises ConfigError on bad input or an untraceable model.
    """
    tracer = Tracer(model_factory_or_config, task=task, optimizer=optimizer, precision=precision,
                    gradient_checkpointing=gradient_checkpointing, make_batch=make_batch,
                    safety_factor=safety_factor)
    return tracer.trace(micro_batch_size, seq_len)


# ---------------------------------------------------------------------------------------
# Search


@dataclass(frozen=True)
class EstimateProbe:
    """One evaluated size: the estimate's total against the budget (bytes, seconds)."""

    size: int
    fit: bool
    seconds: float
    peak_bytes: int


@dataclass(frozen=True)
class EstimateSearch:
    """The largest micro-batch whose estimate fits (0 when none does) and the sizes evaluated, in order."""

    size: int
    budget: int
    probes: tuple[EstimateProbe, ...]


def max_micro_batch_for(
    device_memory_bytes: float,
    estimate: Callable[[int], MemoryEstimate | int],
    *,
    limit: int,
    start: int = 1,
    safety_margin: float = 0.1,
) -> EstimateSearch:
    """The largest micro-batch n in [1, limit] with estimate(n) <= device memory * (1 - safety_margin).

    `estimate(n)` returns bytes (an int or a MemoryEstimate, whose `.total` counts) and must
    grow with n. The search is exact for any such function: it keeps a bracket (largest
    size seen to fit, smallest seen not to) and guesses inside it by interpolating the
    estimate linearly between the two nearest evaluated sizes (memory is close to affine in
    the batch, so this usually takes 3-4 evaluations), falling back to doubling while no
    size has failed and to bisection when guessing does not halve the bracket. Each size
    is evaluated at most once. Pure: nothing runs on a device.
    Returns an EstimateSearch. Raises ConfigError on a non-positive budget or limit.
    """
    if not device_memory_bytes > 0:
        raise ConfigError(f"device memory must be positive (got {device_memory_bytes!r})")
    check_positive_int("limit", limit)
    check_positive_int("start", start)
    if not 0 <= safety_margin < 1:
        raise ConfigError(f"safety_margin must be in [0, 1) (got {safety_margin!r})")
    budget = int(device_memory_bytes * (1 - safety_margin))
    measured: dict[int, int] = {}
    probes: list[EstimateProbe] = []

    def fits(size: int) -> bool:
        started = time.perf_counter()
        result = estimate(size)
        needed = int(result.total if isinstance(result, MemoryEstimate) else result)
        measured[size] = needed
        probes.append(EstimateProbe(size, needed <= budget, time.perf_counter() - started, needed))
        return needed <= budget

    lo, hi = 0, limit + 1  # lo fits (0 trivially), hi does not (limit + 1 by definition)
    guess, interpolated = min(start, limit), False
    slow_guesses = 0  # interpolated guesses in a row that did not halve the bracket
    while hi - lo > 1:
        width = hi - lo
        if fits(guess):
            lo = guess
        else:
            hi = guess
        if interpolated:
            slow_guesses = slow_guesses + 1 if (hi - lo) * 2 > width else 0
        guess, interpolated = _next_guess(lo, hi, limit, budget, measured, bisect=slow_guesses >= 2)
        if not interpolated:
            slow_guesses = 0
    return EstimateSearch(size=lo, budget=budget, probes=tuple(probes))


def _next_guess(lo: int, hi: int, limit: int, budget: int, measured: dict[int, int], *, bisect: bool) -> tuple[int, bool]:
    """A size strictly inside (lo, hi), and whether it was interpolated (rather than doubled or bisected)."""
    if hi - lo <= 1:
        return lo, False
    low_side = [n for n in measured if n <= lo]
    high_side = [n for n in measured if n >= hi]
    guess, interpolated = None, False
    if not bisect:
        # Interpolate between the nearest evaluated sizes on each side; with no failure yet,
        # extrapolate from the two largest fits, and with no fit yet from the two smallest
        # failures (a start far above the answer); with one point only, double or halve.
        if low_side and high_side:
            a, b = max(low_side), min(high_side)
        elif len(low_side) >= 2:
            a, b = sorted(low_side)[-2:]
        elif len(high_side) >= 2:
            a, b = sorted(high_side)[:2]
        else:
            a = b = None
        if a is not None and b is not None and measured[b] > measured[a]:
            slope = (measured[b] - measured[a]) / (b - a)
            guess, interpolated = a + math.floor((budget - measured[a]) / slope), True
        elif hi > limit and lo > 0:
            guess = 2 * lo
    if guess is None:
        guess = (lo + hi) // 2
    return min(max(guess, lo + 1), hi - 1), interpolated


def analytic_estimator(config: Any, task: str) -> Callable[..., MemoryEstimate]:
    """`estimate(micro_batch_size, seq_len, **kwargs)` by `estimate_analytic`, with the sizes read from a
    transformers config and the parameters counted on the meta device. Raises ConfigError."""
    with torch.device("meta"):
        model = _model_from_config(config, task)
    num_params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model", None)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not hidden or not layers:
        raise ConfigError("the model config names no hidden size or layer count: use the traced estimate (`method` traced)")
    vocab = getattr(text, "vocab_size", 0) if task == "clm" else 0

    def estimate(micro_batch_size: int, seq_len: int, **kwargs: Any) -> MemoryEstimate:
        return estimate_analytic(num_params, micro_batch_size, seq_len, hidden_size=hidden, num_layers=layers,
                                 vocab_size=vocab, **kwargs)

    return estimate
