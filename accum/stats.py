"""What a run reports: counters, EMA loss, grad-norm history, throughput, peak memory, adjustments.

`AccumulationStats` is plain bookkeeping with no hold on the model or the accelerator, so it drops
into any Accelerate loop::

    from accum.stats import AccumulationStats

    stats = AccumulationStats(device=accelerator.device)
    for batch in dataloader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            stats.record_micro_batch(samples=len(batch["input_ids"]),
                                     tokens=int(batch["attention_mask"].sum()))
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            record = stats.record_optimizer_step(loss, grad_norm=grad_norm,
                                                 lr=scheduler.get_last_lr()[0],
                                                 skipped=accelerator.optimizer_step_was_skipped)
            accelerator.log(record, step=record["optimizer_step"])
    json.dump(stats.as_dict(), open("metrics.json", "w"))

Counts are whatever the caller passes: pass this rank's samples and tokens for per-rank numbers,
or the window's global counts (e.g. from `accelerator.reduce`) on every rank for run totals.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

__all__ = ["AccumulationStats", "peak_memory"]

_STATE_VERSION = 1


def peak_memory(device: torch.device | str | None = None) -> dict[str, int]:
    """Peak memory of the device the run trains on, in bytes, labelled by what it counts.

    CUDA: {"peak_memory_bytes": the caching allocator's reserved peak (what the device gave the
    run), "peak_memory_allocated_bytes": what tensors held at most} since the last reset of the
    allocator's statistics. Elsewhere: {"peak_memory_bytes": the process's resident high-water
    mark (VmHWM)}, empty where the platform does not say. Never the process's CPU memory for a
    CUDA run."""
    from accum.oom import peak_memory_bytes

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return {"peak_memory_bytes": peak_memory_bytes(device, reserved=True),
                "peak_memory_allocated_bytes": peak_memory_bytes(device, reserved=False)}
    hwm = peak_memory_bytes(device)
    return {"peak_memory_bytes": hwm} if hwm else {}


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)  # a tensor: one host sync, once per optimizer step
    return value if math.isfinite(value) else None


class AccumulationStats:
    """Counters and running measures of a training run with gradient accumulation.

    micro_step counts backward passes, optimizer_step counts completed windows (synced steps,
    including ones the fp16 scaler skipped, which `skipped_steps` also counts), samples_seen and
    tokens_seen sum what `record_micro_batch` was given. ema_beta smooths the loss (bias-corrected);
    device picks where peak memory is read (`peak_memory`: the CUDA allocator's reserved and allocated peaks
    for a CUDA run, the resident set otherwise).
    """

    def __init__(self, ema_beta: float = 0.9, device: torch.device | str | None = None):
        if not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta={ema_beta!r}: must be in [0, 1)")
        self.ema_beta = float(ema_beta)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Forget everything and restart the clock (the device's own peak counters are left alone)."""
        self.micro_step = 0
        self.optimizer_step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.padded_tokens_seen = 0
        self.skipped_steps = 0
        self.last_loss: float | None = None
        self._ema_raw = 0.0
        self._ema_count = 0
        self.grad_norm_history: list[float | None] = []
        self.adjustments: list[dict[str, Any]] = []
        self.elapsed_s = 0.0  # wall time covered by completed optimizer steps
        self.peak: dict[str, int] = {}
        self._restart_clock()

    def _restart_clock(self) -> None:
        self._interval_start = time.perf_counter()
        self._interval_samples = self.samples_seen
        self._interval_tokens = self.tokens_seen
        self._interval_padded = self.padded_tokens_seen

    # -- recording ---------------------------------------------------------------------------------

    def record_micro_batch(self, samples: int, tokens: int = 0) -> None:
        """Count one micro-batch (one backward pass) of `samples` samples and `tokens` tokens."""
        self.micro_step += 1
        self.samples_seen += int(samples)
        self.tokens_seen += int(tokens)

    def record_window(self, micro_batches: int, samples: int, tokens: int = 0, padded_tokens: int = 0) -> None:
        """Count a whole window at once: `micro_batches` backward passes (per process) carrying
        `samples` samples, `tokens` real tokens and `padded_tokens` tokens with padding (all
        processes together, as the window holds them)."""
        self.micro_step += int(micro_batches)
        self.samples_seen += int(samples)
        self.tokens_seen += int(tokens)
        self.padded_tokens_seen += int(padded_tokens)

    @property
    def ema_loss(self) -> float | None:
        """Bias-corrected exponential moving average of the finite losses seen; None before any."""
        if self._ema_count == 0:
            return None
        return self._ema_raw / (1.0 - self.ema_beta**self._ema_count)

    def record_optimizer_step(
        self, loss: Any, grad_norm: Any = None, lr: float | None = None, skipped: bool = False
    ) -> dict[str, Any]:
        """Close one window: update the counters, EMA loss and throughput; return the log record.

        loss and grad_norm may be floats or 0-d tensors (read once here). Throughput is over the wall
        time since the previous optimizer step (or since construction, reset or load_state_dict).
        Returns a flat dict of scalars (None where unknown): optimizer_step, micro_step, loss,
        ema_loss, lr, grad_norm, samples_seen, tokens_seen, samples_per_s, tokens_per_s,
        peak_memory_bytes (CUDA: reserved, with peak_memory_allocated_bytes; CPU: resident set),
        memory_device, skipped, skipped_steps.
        """
        now = time.perf_counter()
        interval = now - self._interval_start
        samples = self.samples_seen - self._interval_samples
        tokens = self.tokens_seen - self._interval_tokens
        padded = self.padded_tokens_seen - self._interval_padded
        self.elapsed_s += interval
        self._interval_start = now
        self._interval_samples, self._interval_tokens = self.samples_seen, self.tokens_seen
        self._interval_padded = self.padded_tokens_seen

        self.optimizer_step += 1
        if skipped:
            self.skipped_steps += 1
        loss_value = _finite_or_none(loss)
        self.last_loss = loss_value
        if loss_value is not None:
            self._ema_raw = self.ema_beta * self._ema_raw + (1.0 - self.ema_beta) * loss_value
            self._ema_count += 1
        grad_norm_value = _finite_or_none(grad_norm)
        self.grad_norm_history.append(grad_norm_value)

        memory = peak_memory(self.device)
        for key, value in memory.items():
            self.peak[key] = max(self.peak.get(key, 0), value)

        return {
            "optimizer_step": self.optimizer_step,
            "micro_step": self.micro_step,
            "loss": loss_value,
            "ema_loss": self.ema_loss,
            "lr": None if lr is None else float(lr),
            "grad_norm": grad_norm_value,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "samples_per_s": samples / interval if interval > 0 else None,
            "tokens_per_s": tokens / interval if interval > 0 else None,
            "padding_efficiency": tokens / padded if padded else None,
            **memory,
            "memory_device": self.device.type,
            "skipped": bool(skipped),
            "skipped_steps": self.skipped_steps,
        }

    def record_adjustment(self, **fields: Any) -> dict[str, Any]:
        """Log a change to the plan (e.g. OOM recovery: old and new micro-batch and accumulation,
        reason). optimizer_step and micro_step are filled in unless given; returns the entry."""
        entry = {"optimizer_step": self.optimizer_step, "micro_step": self.micro_step, **fields}
        self.adjustments.append(entry)
        return entry

    # -- reporting ---------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """Summary of the run for metrics.json (JSON-able): counters, final and EMA loss, grad-norm
        history, throughput over the timed optimizer steps, peak memory in bytes, adjustments."""
        elapsed = self.elapsed_s
        peak = dict(self.peak)
        for key, value in peak_memory(self.device).items():
            peak[key] = max(peak.get(key, 0), value)
        return {
            "micro_step": self.micro_step,
            "optimizer_step": self.optimizer_step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "final_loss": self.last_loss,
            "ema_loss": self.ema_loss,
            "grad_norm_history": list(self.grad_norm_history),
            "elapsed_s": elapsed,
            "samples_per_s": self.samples_seen / elapsed if elapsed > 0 else None,
            "tokens_per_s": self.tokens_seen / elapsed if elapsed > 0 else None,
            "padded_tokens_seen": self.padded_tokens_seen,
            "padding_efficiency": self.tokens_seen / self.padded_tokens_seen if self.padded_tokens_seen else None,
            "peak_memory_bytes": peak.get("peak_memory_bytes"),
            "peak_memory_allocated_bytes": peak.get("peak_memory_allocated_bytes"),
            "memory_device": self.device.type,
            "adjustments": [dict(a) for a in self.adjustments],
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for resuming; the clock is not saved (it restarts on load)."""
        return {
            "version": _STATE_VERSION,
            "ema_beta": self.ema_beta,
            "micro_step": self.micro_step,
            "optimizer_step": self.optimizer_step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "padded_tokens_seen": self.padded_tokens_seen,
            "skipped_steps": self.skipped_steps,
            "last_loss": self.last_loss,
            "ema_raw": self._ema_raw,
            "ema_count": self._ema_count,
            "grad_norm_history": list(self.grad_norm_history),
            "adjustments": [dict(a) for a in self.adjustments],
            "elapsed_s": self.elapsed_s,
            "peak": dict(self.peak),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; raises ValueError for a state from an unknown version, or counters
        that are not whole numbers >= 0."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"stats state version {state.get('version')!r}: expected {_STATE_VERSION}")
        for key in ("micro_step", "optimizer_step", "samples_seen", "tokens_seen", "skipped_steps", "ema_count"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"stats state {key}={value!r}: must be a whole number >= 0")
        self.ema_beta = float(state["ema_beta"])
        self.micro_step = int(state["micro_step"])
        self.optimizer_step = int(state["optimizer_step"])
        self.samples_seen = int(state["samples_seen"])
        self.tokens_seen = int(state["tokens_seen"])
        self.padded_tokens_seen = int(state.get("padded_tokens_seen", 0))
        self.skipped_steps = int(state["skipped_steps"])
        self.last_loss = state["last_loss"]
        self._ema_raw = float(state["ema_raw"])
        self._ema_count = int(state["ema_count"])
        self.grad_norm_history = list(state["grad_norm_history"])
        self.adjustments = [dict(a) for a in state["adjustments"]]
        self.elapsed_s = float(state["elapsed_s"])
        self.peak = {k: int(v) for k, v in state["peak"].items()}
        self._restart_clock()
