"""Fine-tune a transformers model with exact gradient accumulation.

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train.py --config configs/default.yaml
    python scripts/train.py --config configs/clm_tiny.yaml --max-steps 20

The loop reads top to bottom: fetch one window (the data of one optimizer step on
all ranks), count its items on all ranks, then run its micro-batches inside
`accelerator.accumulate()`, back-propagating each micro-batch's loss *sum* scaled
so that the accumulated gradient is the mean over every item of the window
(accum/loss.py). The optimizer, scheduler, clipping and logging act only when
`accelerator.sync_gradients` is true.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `scripts` and `accum` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm

from accum.accelerator import begin_window, build_accelerator
from accum.adaptive import AdaptiveBatch, Decision, OutOfMemoryError, advice, any_rank
from accum.config import ConfigError, RunConfig, config_to_json, parse_config
from accum.loss import backward_scale, count_loss_items, mean_of_means_loss, sum_item_losses
from accum.noise import NoiseMeter
from accum.oom import free_memory, is_oom, peak_memory_bytes, reset_peak_memory
from accum.plan import Plan, plan_batch, plan_from_accumulation, resolve_batch
from accum.scaling import ScaledLR, scale_lr
from accum.schedule import BatchSchedule, Change, Progress, SampleLR, schedule_from_config
from accum.signals import Interrupted, StopRequest
from accum.stats import AccumulationStats
from accum.windows import epoch_order, layout_window, windows_per_epoch
from scripts import checkpoint as ckpt
from scripts import data as data_lib


@dataclass
class Position:
    """Where training is, in units: optimizer steps, micro-steps, and the data position."""

    optimizer_step: int = 0
    micro_step: int = 0
    epoch: int = 0
    window_in_epoch: int = 0
    sample_in_epoch: int = 0  # the data position: windows change size under a batch schedule
    samples_seen: int = 0  # all ranks together
    tokens_seen: int = 0  # all ranks together; counted for a token-keyed schedule only


# ----------------------------------------------------------------------------- setup


def check_output_dir(config: RunConfig) -> Path:
    """Refuse to write over a finished run unless asked, or where nothing can be written. Creates
    nothing (train creates the directory once every input is checked): bad input touches no file."""
    out = Path(config.output_dir)
    finished = (out / "metrics.json").exists()
    if finished and not config.overwrite and not config.resume_from_checkpoint:
        raise ConfigError(f"output dir {str(out)!r} holds a finished run: pass --overwrite, "
                          "--resume-from-checkpoint latest, or another --output-dir")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output dir {str(out)!r} exists and is not a directory: choose another --output-dir")
    existing = next(parent for parent in (out, *out.absolute().parents) if parent.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a parent is not a directory")
        with tempfile.TemporaryFile(dir=existing):  # the one real test of writability (root ignores modes)
            pass
    except OSError as exc:
        raise ConfigError(f"output dir {str(out)!r} cannot be written ({exc.strerror}): choose another --output-dir") from None
    return out


def resolve_precision(config: RunConfig) -> str | None:
    """--mixed-precision wins; --use-amp means fp16 on CUDA and bf16 elsewhere; None defers to accelerate's config."""
    if config.mixed_precision is not None:
        return config.mixed_precision
    if config.use_amp:
        return "fp16" if torch.cuda.is_available() else "bf16"
    return None


def model_identity(config: RunConfig) -> str:
    """A short id of the model for the plan cache and checkpoint checks."""
    if config.model:
        return config.model
    blob = json.dumps(config.model_config_overrides, sort_keys=True)
    return "config-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def data_fingerprint(dataset) -> str:
    """Cheap identity of a tokenised data set: size and the first and last samples' tokens."""
    first, last = dataset[0], dataset[len(dataset) - 1]
    blob = json.dumps([len(dataset), list(first["input_ids"]), list(last["input_ids"])])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def worst_case_examples(dataset, count: int, seq_len: int) -> list[dict]:
    """`count` samples of full length `seq_len`, for probing memory at the longest batch training can meet."""
    example = dict(dataset[0])
    ids = list(example["input_ids"]) or [0]
    example["input_ids"] = (ids * (seq_len // len(ids) + 1))[:seq_len]
    return [dict(example) for _ in range(count)]


def move_to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def forward_loss_sum(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Sum of per-item losses of one micro-batch (the model's own mean loss is not used)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sum_item_losses(logits, batch["labels"], task)


def resolve_batch_flags(config: RunConfig, cli_keys: set[str], num_processes: int):
    """(target, micro or None, accum or None, note): checked before any data is loaded or memory probed.
    With a batch schedule the target is the schedule's first batch, and the accumulation follows it."""
    schedule = schedule_from_config(config)
    if schedule is None:
        return resolve_batch(config.batch_size, config.micro_batch_size, config.grad_accum_steps, num_processes,
                             cli_keys)
    start = schedule.start_batch
    micro, accum = config.micro_batch_size, config.grad_accum_steps
    if accum != "auto" and (micro == "auto" or micro * accum * num_processes != start):
        raise ConfigError(f"grad_accum_steps {accum} is set by the batch schedule (first batch {start}): "
                          "leave --grad-accum-steps auto and give --micro-batch-size")
    target, micro, accum, note = resolve_batch(start, micro, "auto", num_processes)
    if micro is not None:
        schedule.bind(micro, num_processes)  # a batch no split reaches: said before any data loads
    if "batch_size" in config.model_fields_set and config.batch_size != start and config.adaptive_batch == "none":
        note = "\n".join(filter(None, [note, f"batch size {config.batch_size} not used: the batch schedule starts "
                                              f"at {start}"]))
    return target, micro, accum, note


def lr_base_batch(config: RunConfig) -> int:
    """The batch the LR was tuned for: base_batch_size, else the schedule's first batch, else batch_size."""
    schedule = schedule_from_config(config)
    return config.base_batch_size or (schedule.start_batch if schedule else config.batch_size)


def probe_length(config: RunConfig, model) -> int:
    """Tokens per probed sample: max_seq_len, the longest training can meet, within the model's positions."""
    model_config = getattr(model, "module", model).config  # DDP-wrapped after prepare() on several ranks
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    return min(config.max_seq_len, limit) if limit else config.max_seq_len


def probe_batch_maker(config: RunConfig, model, train_ds, collate, device):
    """make_batch(n) for the planner: n samples of the worst-case length."""
    length = probe_length(config, model)

    def make_batch(n: int) -> dict[str, torch.Tensor]:
        return move_to(collate(worst_case_examples(train_ds, n, length)), device)

    return make_batch


def plan_eval_batch_size(config: RunConfig, model, train_ds, eval_ds, collate, plan: Plan, state) -> int:
    """--eval-batch-size, or the largest forward-only batch that fits, probed from the training
    micro-batch up to 8 times it (no gradients or optimizer state, so it is larger)."""
    from accum.probe import plan_eval_batch

    if config.eval_batch_size != "auto":
        return config.eval_batch_size
    if not eval_ds:  # nothing to evaluate: no probes (they cost as much as a training step or two)
        return plan.micro_batch_size
    per_process = math.ceil(len(eval_ds) / state.num_processes)
    limit = max(1, min(8 * plan.micro_batch_size, per_process))
    start = min(plan.micro_batch_size, limit)
    result = plan_eval_batch(model, probe_batch_maker(config, model, train_ds, collate, state.device), limit=limit,
                             start=start, max_memory=config.max_memory, safety_margin=config.safety_margin,
                             progress=False)
    return result.size


def plan_cache_key(config: RunConfig) -> str:
    """The plan cache's key for this run: what the planner reads and what OOM recovery rewrites."""
    return f"{model_identity(config)}|seq{config.max_seq_len}|{resolve_precision(config)}|{config.optimizer}|{config.task}"


def make_plan(config: RunConfig, resolved, model, optimizer, train_ds, collate, state) -> tuple[Plan, str | None]:
    """Micro-batch x accumulation x processes for the target batch: from flags, or by probing memory."""
    from accum.probe import plan_for

    world = state.num_processes
    target, micro, accum, note = resolved
    if micro is not None and accum is not None:
        return plan_from_accumulation(micro, accum, world), note

    make_batch = probe_batch_maker(config, model, train_ds, collate, state.device)

    def loss_fn(probe_model, batch):
        return forward_loss_sum(probe_model, batch, config.task) / batch["labels"].numel()

    plan = plan_for(model, make_batch, target, None, optimizer, loss_fn=loss_fn, max_memory=config.max_memory,
                    safety_margin=config.safety_margin, objective=config.objective, cache_path=config.plan_cache,
                    cache_key=plan_cache_key(config), replan=config.replan, allow_rounding=config.allow_batch_rounding,
                    progress=state.is_main_process)
    return plan, note


def build_optimizer(config: RunConfig, model, lr: float) -> torch.optim.Optimizer:
    """torch AdamW/SGD, or bitsandbytes' 8-bit AdamW/Lion (which run on CPU too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    import bitsandbytes as bnb

    if config.optimizer == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=config.weight_decay)
    return bnb.optim.Lion8bit(params, lr=lr, weight_decay=config.weight_decay)


def build_scheduler(config: RunConfig, optimizer, total_steps: int):
    """An LR schedule in optimizer steps. Not passed to accelerator.prepare: Accelerate would step it
    once per process per optimizer step (DESIGN.md: LR 0.70 on one process, 0.40 on two)."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


def total_optimizer_steps(config: RunConfig, num_samples: int, effective_batch: int) -> int:
    """max_steps, or epochs x windows per epoch (a partial last window is one more step)."""
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = windows_per_epoch(num_samples, effective_batch)
    return max(1, math.ceil((config.epochs or 1.0) * per_epoch))


def banner(config: RunConfig, model, state, plan: Plan, lr: ScaledLR, total_steps: int, precision: str,
           eval_batch: int, note: str | None) -> str:
    params = sum(p.numel() for p in model.parameters())
    lines = [
        f"Model: {model_identity(config)} ({config.task}), {params / 1e6:.1f}M parameters",
        f"Device: {state.device} x {state.num_processes} process{'es' if state.num_processes > 1 else ''}, "
        f"precision {precision}",
        f"Optimizer: {config.optimizer}, LR {lr.describe()}, schedule {config.lr_scheduler}, "
        f"warmup {config.warmup_steps} steps",
        f"Length: {total_steps} optimizer steps; eval batch {eval_batch} per process",
        f"Loss normalisation: {config.resolved_loss_normalization()}",
        plan.banner(),
    ]
    if note:
        lines.append(note)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the loop


def iterate_windows(num_samples: int, window_size, seed: int, start: Position):
    """Yield (epoch, window_in_epoch, indices) forever from `start`, which counts the data position in
    samples; the order depends only on (seed, epoch). `window_size` is the effective batch, or a
    callable giving the next window's (a batch schedule changes it between windows, never inside
    one); the last window of an epoch may be partial."""
    size_of = window_size if callable(window_size) else (lambda: window_size)
    epoch, window, offset = start.epoch, start.window_in_epoch, start.sample_in_epoch
    while True:
        order = epoch_order(num_samples, seed, epoch)
        while offset < num_samples:
            indices = order[offset:offset + size_of()]
            yield epoch, window, indices
            window, offset = window + 1, offset + len(indices)
        epoch, window, offset = epoch + 1, 0, 0


def train_window(run: Run, batches: list, stand_in, position: Position) -> dict[str, Any] | None:
    """Run one window's micro-batches; take exactly one optimizer step at its end. Returns the step's
    record, or None when OOM recovery is on and some rank ran out of memory in a forward or backward:
    then no rank steps, and the caller drops the gradients and replays the window smaller."""
    accelerator, config, model = run.accelerator, run.config, run.model
    normalization = config.resolved_loss_normalization()
    begin_window(accelerator, len(batches))
    local_items = sum(count_loss_items(b["labels"], config.task, normalization) for b in batches if b is not None)
    window_items = int(accelerator.reduce(torch.tensor([local_items], device=accelerator.device), "sum").item())
    scale = backward_scale(len(batches), accelerator.num_processes, window_items)
    if run.noise is not None:
        run.noise.start_window(accelerator.num_processes / window_items * loss_scale(accelerator))
    if run.memory_budget:
        reset_peak_memory(accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device)
    counted, out_of_memory = [], False
    # deferred sync (recovery on several DDP ranks): no all-reduce inside backward, where an OOM on one
    # rank would leave the others waiting; the gradients are averaged once every rank has succeeded
    with accelerator.no_sync(model) if run.defer_sync else contextlib.nullcontext():
        for batch in batches:
            with accelerator.accumulate(model):
                empty = batch is None
                if empty and not accelerator.sync_gradients:
                    continue  # nothing to add, and no collective happens off the sync step
                # an empty micro-batch on the sync step still runs (at zero weight) so this rank joins the all-reduce
                micro = move_to(stand_in if empty else batch, accelerator.device)
                try:
                    micro_loss = forward_loss_sum(model, micro, config.task)
                    items = 0 if empty else count_loss_items(micro["labels"], config.task, normalization)
                    if normalization == "mean":
                        to_backward = mean_of_means_loss(micro_loss, items)
                    else:
                        to_backward = micro_loss * scale
                    accelerator.backward(to_backward * (0.0 if empty else 1.0))
                except Exception as exc:
                    if run.adaptive is None or not is_oom(exc):
                        raise
                    out_of_memory = True
            if out_of_memory:
                break  # the tensors of the failed micro-batch die with this frame's locals below
            if not empty:
                loss_sum += micro_loss.detach()
                counted.append((micro["labels"].shape[0], int(micro["attention_mask"].sum())))
                if run.noise is not None:
                    run.noise.after_backward(items)
    if run.adaptive is not None:
        peak = peak_memory_bytes(accelerator.device) / run.memory_budget if run.memory_budget else 0.0
        failed, run.window_peak = any_rank(out_of_memory, accelerator, peak)  # the one extra collective
        if failed:
            return None
        if run.defer_sync:
            all_reduce_gradients(model, accelerator)
    for samples, tokens in counted:  # counted once the window stands, so a replay is not counted twice
        position.micro_step += 1
        run.stats.record_micro_batch(samples=samples, tokens=tokens)
    b_simple = None
    if run.noise is not None:  # before clipping changes the gradients
        b_simple = run.noise.finish_window(local_items, window_items, lambda t: accelerator.reduce(t, "mean"))
    record = finish_optimizer_step(run, loss_sum, window_items)
    record["noise_b_simple"] = b_simple
    return record


def all_reduce_gradients(model, accelerator, bucket_bytes: int = 25 * 2**20) -> None:
    """Average the gradients over ranks, as DDP's sync backward would, in flat buckets of ~25 MiB."""
    grads = []
    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:  # a rank that saw no data for it still joins with zeros
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
        flat /= accelerator.num_processes
        for target, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
            target.copy_(reduced)
        bucket, size = ([grad], grad.numel() * grad.element_size()) if grad is not None else ([], 0)


def run_window(run: Run, indices: list[int], position: Position) -> dict[str, Any]:
    """One optimizer step on the window `indices`. With OOM recovery: on an OOM in any rank's forward
    or backward, drop the gradients, shrink the micro-batch (same effective batch) and replay the
    window from its start; at micro-batch 1, save a checkpoint and raise OutOfMemoryError."""
    while True:
        batches, stand_in = fetch_window(run.train_data, run.collate, indices, run.plan, run.accelerator)
        record = train_window(run, batches, stand_in, position)
        if record is not None:
            break
        del batches, stand_in
        run.optimizer.zero_grad(set_to_none=True)
        free_memory()
        decision = run.adaptive.on_oom("forward/backward")
        if decision is None:
            save(run, position)  # the state before this window: resuming replays it
            raise OutOfMemoryError(advice("forward/backward", position.optimizer_step + 1, run.plan.micro_batch_size)
                                   + "; then --resume-from-checkpoint latest")
        adopt_plan(run, decision, position.optimizer_step + 1)  # the replayed step
    decision = run.adaptive.after_window(run.window_peak) if run.adaptive is not None else None
    if decision is not None:
        adopt_plan(run, decision, position.optimizer_step + 2)  # this step is done; the next one changes
    return record


def adopt_plan(run: Run, decision: Decision, optimizer_step: int) -> None:
    """Train with `decision.new` from `optimizer_step` (the first step it takes) on: log it (console,
    metrics.json, tracker) and update the plan cache, so that the next run starts from the safe plan."""
    from accum.cache import PlanCache

    run.plan = decision.new
    peak = peak_memory_bytes(run.accelerator.device)
    run.stats.record_adjustment(**decision.record(optimizer_step=optimizer_step, peak_memory_bytes=peak))
    run.accelerator.print(f"adjusted from optimizer step {optimizer_step}: {decision.describe()}; "
                          f"peak memory {peak / 2**20:.0f} MiB")
    if run.config.report_to != "none":
        run.accelerator.log({"adjustment/micro_batch_size": decision.new.micro_batch_size,
                             "adjustment/accumulation_steps": decision.new.accumulation_steps}, step=optimizer_step)
    if run.accelerator.is_main_process:
        write_json_atomic(run.out / "plan.json", run.plan.to_dict())
        PlanCache(run.config.plan_cache).put(plan_cache_key(run.config), run.plan.to_dict())


def loss_scale(accelerator) -> float:
    """fp16's current loss scale (gradients hold it until clipping unscales them), else 1."""
    return float(accelerator.scaler.get_scale()) if accelerator.scaler is not None else 1.0


def finish_optimizer_step(run: Run, loss_sum: torch.Tensor, window_items: int) -> dict[str, Any]:
    """Check, clip, step, log: once per window, on the sync micro-batch."""
    accelerator, config, optimizer = run.accelerator, run.config, run.optimizer
    window_loss = accelerator.reduce(loss_sum.reshape(1), "sum").item() / max(window_items, 1)
    if not math.isfinite(window_loss):
        refuse_nonfinite(run, f"loss is {window_loss}")
        return run.stats.record_optimizer_step(loss=window_loss, lr=optimizer.param_groups[0]["lr"], skipped=True)
    max_norm = config.max_grad_norm if config.max_grad_norm else float("inf")
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    if accelerator.scaler is None and not math.isfinite(float(grad_norm)):  # fp16's scaler handles its own
        refuse_nonfinite(run, f"gradient norm is {float(grad_norm)}")
        return run.stats.record_optimizer_step(loss=window_loss, lr=optimizer.param_groups[0]["lr"], skipped=True)
    try:
        optimizer.step()
    except Exception as exc:
        if not is_oom(exc):
            raise
        # a partial update cannot be replayed exactly, and a smaller micro-batch would not help
        raise OutOfMemoryError(advice("optimizer step", run.stats.optimizer_step + 1)) from None
    skipped = accelerator.optimizer_step_was_skipped  # fp16: the scaler found inf/nan gradients
    if not skipped:
        run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    return run.stats.record_optimizer_step(loss=window_loss, grad_norm=float(grad_norm), lr=lr, skipped=skipped)


def refuse_nonfinite(run: Run, what: str) -> None:
    """A NaN/inf window never updates the weights: drop its gradients, then with --skip-nonfinite
    go on (the caller records a skipped step); otherwise save the state before the window and raise
    FloatingPointError naming the optimizer step."""
    run.optimizer.zero_grad(set_to_none=True)
    step = run.stats.optimizer_step + 1
    if run.config.skip_nonfinite:
        run.accelerator.print(f"skipped optimizer step {step}: {what} (--skip-nonfinite)")
        return
    if run.window_start is None:
        raise FloatingPointError(f"{what} at optimizer step {step}")
    path = save_last_good(run)
    raise FloatingPointError(f"{what} at optimizer step {step}; the state before it is saved as {path}")


@torch.no_grad()
def evaluate_model(accelerator, model, eval_ds, collate, config: RunConfig, eval_batch: int,
                   recover: bool = False) -> dict[str, float] | None:
    """Loss and task metric on the eval set, shared across ranks without duplicated samples.
    With `recover`, an OOM on any rank returns None on every rank (the caller retries smaller)."""
    from accelerate.utils import gather_object

    from accum.windows import rank_share

    model.eval()
    start, stop = rank_share(len(eval_ds), accelerator.num_processes, accelerator.process_index)
    loss_sum, items, predictions, references, out_of_memory = 0.0, 0, [], [], False
    for first in range(start, stop, eval_batch):
        batch = move_to(collate([eval_ds[i] for i in range(first, min(first + eval_batch, stop))]), accelerator.device)
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum += sum_item_losses(logits, batch["labels"], config.task).item()
        except Exception as exc:
            if not (recover and is_oom(exc)):
                raise
            out_of_memory = True
            break
        items += count_loss_items(batch["labels"], config.task, "tokens")
        if config.task == "classification":
            predictions += logits.argmax(-1).tolist()
            references += batch["labels"].tolist()
    # the OOM flag rides on the reduce that happens anyway: no extra collective
    totals = accelerator.reduce(torch.tensor([loss_sum, float(items), float(out_of_memory)],
                                             device=accelerator.device), "sum").tolist()
    if totals[2] > 0:
        model.train()
        return None
    predictions, references = gather_object(predictions), gather_object(references)
    model.train()
    eval_loss = totals[0] / max(totals[1], 1)
    return data_lib.compute_eval_metrics(config.task, predictions, references, eval_loss)


# ----------------------------------------------------------------------------- reporting


class MetricsLog:
    """metrics.jsonl, one line per optimizer step, appended and flushed by the main process."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            # resume: drop lines of steps after the checkpoint, which will be run again
            kept = [line for line in path.read_text().splitlines() if 0 < _logged_step(line) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif enabled and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> int:
    """The optimizer step of a metrics.jsonl line; 0 for a blank or torn one (a kill mid-write)."""
    try:
        return int(json.loads(line).get("optimizer_step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def format_step_line(record: dict[str, Any], total_steps: int) -> str:
    grad = record.get("grad_norm")
    loss, ema = (float("nan") if v is None else v for v in (record["loss"], record["ema_loss"]))  # a skipped step
    return (f"step {record['optimizer_step']}/{total_steps} micro_step {record['micro_step']} "
            f"loss {loss:.4f} ema {ema:.4f} lr {record.get('lr') or 0:.3g} "
            f"grad_norm {grad if grad is None else round(grad, 4)} tok/s {record.get('tokens_per_s', 0):.0f}")


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def tracker_config(config: RunConfig, plan: Plan, lr: float) -> dict[str, Any]:
    """Scalars only (TensorBoard's hparams reject the rest)."""
    flat = {k: v for k, v in config.model_dump().items() if isinstance(v, (int, float, str, bool))}
    flat.update(effective_batch_size=plan.effective_batch_size, gradient_accumulation_steps=plan.accumulation_steps,
                micro_batch_size=plan.micro_batch_size, num_processes=plan.num_processes, scaled_lr=lr)
    return flat


# ----------------------------------------------------------------------------- train()


def fetch_window(train_data, collate, indices, plan: Plan, accelerator) -> tuple[list, dict]:
    """This rank's micro-batches of one window (None for an empty one) and a one-sample stand-in."""
    layout = layout_window(indices, plan.micro_batch_size, accelerator.num_processes, accelerator.process_index)
    batches = [collate([train_data[i] for i in chunk]) if chunk else None for chunk in layout.micro_batches]
    stand_in = collate([train_data[indices[0]]]) if None in batches else None
    return batches, stand_in


def checkpoint_state(config: RunConfig, position: Position, stats: AccumulationStats, fingerprint: dict,
                     plan: Plan, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**asdict(position), "stats": stats.state_dict(), "fingerprint": fingerprint, "plan": plan.to_dict(),
            "config": json.loads(config_to_json(config)), **(extra or {})}


def save(run, position: Position, stats: AccumulationStats | None = None, rng: dict | None = None) -> Path:
    """Checkpoint `position` on all ranks; return its directory. A step this process already saved
    (or resumed from) is not written again: rewriting it would open a window where a kill loses it."""
    if run.saved_step == position.optimizer_step:
        return ckpt.checkpoint_root(run.config.output_dir) / f"step-{position.optimizer_step:08d}"
    path = ckpt.save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler,
                                checkpoint_state(run.config, position, stats or run.stats, run.fingerprint, run.plan,
                                                 schedule_state(run)),
                                run.config.output_dir, run.config.keep_checkpoints, rng=rng)
    run.saved_step = position.optimizer_step
    run.accelerator.print(f"saved checkpoint {path}")
    return path


def at_step_boundary(run, stop: StopRequest, position: Position) -> None:
    """Between two optimizer steps: stop if any rank got SIGTERM/SIGINT (saving first, raising
    Interrupted), else remember the state before the next window, for a non-finite loss to save."""
    signum = stop.agreed(run.accelerator)
    if signum is not None:
        path = save(run, position)
        raise Interrupted(signum, position.optimizer_step, path)
    counters = {key: getattr(run.stats, key) for key in ("micro_step", "samples_seen", "tokens_seen")}
    run.window_start = {"position": asdict(position), "counters": counters, "rng": ckpt.rng_state()}


def save_last_good(run) -> Path:
    """Checkpoint the state before the window in flight (weights and optimizer are untouched by it:
    it never stepped), with that window's counters and RNG rolled back, so resuming replays it."""
    start = run.window_start
    stats = AccumulationStats()
    stats.load_state_dict(dict(run.stats.state_dict(), **start["counters"]))
    return save(run, Position(**start["position"]), stats=stats, rng=start["rng"])


def resume_if_asked(run, position: Position) -> int | None:
    """Load the checkpoint named by --resume-from-checkpoint; return its optimizer step (None: fresh start)."""
    config = run.config
    if not config.resume_from_checkpoint:
        return None
    path = ckpt.resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    saved = ckpt.read_state(path)
    check_fingerprint(saved.get("fingerprint", {}), run.fingerprint, config.allow_batch_change, path)
    state = ckpt.load_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler, path)
    for key in asdict(position):
        setattr(position, key, int(state.get(key, 0)))
    if "sample_in_epoch" not in state:  # a checkpoint from before the data position was kept in samples
        position.sample_in_epoch = position.window_in_epoch * int(state["plan"]["effective_batch_size"])
    restore_schedule(run, state, position)
    run.stats.load_state_dict(state["stats"])
    run.accelerator.print(f"resumed from {path} at optimizer step {position.optimizer_step}")
    return position.optimizer_step


def check_fingerprint(saved: dict, current: dict, allow_batch_change: bool, path: Path) -> None:
    """A checkpoint of another model, data set or effective batch is refused (ConfigError)."""
    for key in ("model", "data", "task"):
        if saved.get(key) != current[key]:
            raise ConfigError(f"checkpoint {str(path)!r} is from another {key} ({saved.get(key)!r}, now "
                              f"{current[key]!r}): resume with the run's own config or start a new --output-dir")
    if saved.get("effective_batch_size") != current["effective_batch_size"] and not allow_batch_change:
        raise ConfigError(f"checkpoint {str(path)!r} trained with effective batch {saved.get('effective_batch_size')}, "
                          f"now {current['effective_batch_size']}: keep --batch-size or pass --allow-batch-change")


def final_metrics(stats: AccumulationStats, plan: Plan, eval_metrics: dict, train_seconds: float,
                  lr: ScaledLR) -> dict[str, Any]:
    summary = stats.as_dict()
    summary.update(eval=eval_metrics, plan=plan.to_dict(), train_seconds=round(train_seconds, 3), lr=lr.lr,
                   effective_batch_size=plan.effective_batch_size, micro_batch_size=plan.micro_batch_size,
                   gradient_accumulation_steps=plan.accumulation_steps, num_processes=plan.num_processes)
    return summary


def noise_summary(run: Run) -> dict[str, Any]:
    """The smoothed noise-scale estimates for metrics.json, B_simple also in samples: the tracker works
    in loss items, which are tokens under token-weighted normalisation."""
    summary = run.noise.tracker.as_dict()
    tokens = run.config.resolved_loss_normalization() == "tokens"
    b_simple = summary["noise_b_simple"]
    summary.update(noise_items="tokens" if tokens else "samples", noise_method=run.noise.method,
                   noise_b_simple_samples=None if b_simple is None else b_simple / loss_items_per_sample(run))
    return summary


def loss_items_per_sample(run: Run) -> float:
    """Loss items per sample seen so far: tokens per sample under token-weighted normalisation (the unit
    B_simple is measured in then), else 1."""
    if run.config.resolved_loss_normalization() == "tokens" and run.stats.samples_seen:
        return run.stats.tokens_seen / run.stats.samples_seen
    return 1.0


def describe_noise(metrics: dict[str, Any]) -> str:
    """The final noise-scale line: B_simple against the effective batch trained with, or why it is unknown."""
    b_simple = metrics.get("noise_b_simple")
    if metrics.get("noise_method") is None:
        return "noise scale: not measured (one process with accumulation 1; see the note at the start)"
    if b_simple is None:
        return (f"noise scale: not known after {metrics['noise_updates']} measured steps (needs 10, and a "
                "positive |G|^2 estimate): train longer, or with accumulation >= 2")
    in_samples = "" if metrics["noise_items"] == "samples" else f" = {metrics['noise_b_simple_samples']:.1f} samples"
    return (f"noise scale: B_simple {b_simple:.0f} {metrics['noise_items']}{in_samples} after {metrics['noise_updates']} steps (effective batch {metrics['effective_batch_size']}); "
            "`python -m accum recommend --run <output_dir>` suggests a batch")


@dataclass
class Run:
    """What the loop needs, built once by `setup`."""

    config: RunConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    plan: Plan
    lr: ScaledLR
    train_data: Any
    eval_data: Any
    collate: Any
    total_steps: int
    eval_batch: int
    stats: AccumulationStats
    fingerprint: dict
    out: Path
    noise: NoiseMeter | None = None
    schedule: BatchSchedule | None = None  # the effective batch changes between windows (accum/schedule.py)
    total_samples: int | None = None  # the run's length in samples, when a schedule or max_samples sets it
    adaptive: AdaptiveBatch | None = None  # OOM recovery on (accum/adaptive.py)
    defer_sync: bool = False  # several DDP ranks: gradients all-reduced after every rank's backwards succeed
    memory_budget: int | None = None  # bytes, for --memory-pressure
    window_peak: float = 0.0  # the last window's peak memory / budget, largest over ranks
    saved_step: int | None = None  # the optimizer step this process last checkpointed (or resumed from)
    window_start: dict | None = None  # position, counters and RNG before the window in flight: the last good state


def setup(config: RunConfig, cli_keys: set[str], model, train_data, eval_data) -> tuple[Run, str]:
    """Everything before the loop: output dir, data, model, plan, accelerator, optimizer, schedule.
    Returns the run and the banner text."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Accelerator() honours ACCELERATE_USE_CPU but PartialState() does not (accelerate 1.15): without
    # this, each CPU rank of `accelerate launch --multi_gpu` would train alone as a world of one.
    # a bounded wait: a rank whose peer died stops with an error instead of hanging (gloo's default is 30 min)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(seconds=config.dist_timeout_s))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > state.num_processes:
        raise ConfigError(f"{launched} processes were launched but each sees a world of {state.num_processes}: "
                          "on a machine without GPUs, launch with ACCELERATE_USE_CPU=1")
    torch.manual_seed(config.seed)
    resolved = resolve_batch_flags(config, cli_keys, state.num_processes)
    out = check_output_dir(config)
    tokenizer, label_info = None, None
    if train_data is None:
        tokenizer = data_lib.build_tokenizer(config)
        train_raw, eval_raw = data_lib.load_splits(config)
        train_data, eval_data, label_info = data_lib.tokenize_splits(config, tokenizer, train_raw, eval_raw)
    if model is None:
        model = data_lib.build_model(config, label_info.num_labels if label_info else 0, tokenizer=tokenizer,
                                     id2label=label_info.id2label if label_info else None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    collate = data_lib.make_collate(config.task, pad_id)
    model.to(state.device)
    model.train()
    probe_optimizer = build_optimizer(config, model, config.lr)
    plan, note = make_plan(config, resolved, model, probe_optimizer, train_data, collate, state)
    del probe_optimizer
    lr = scale_lr(config.lr, lr_base_batch(config), plan.effective_batch_size, config.lr_scaling)
    accelerator = build_accelerator(plan, mixed_precision=resolve_precision(config), log_with=config.report_to,
                                    project_dir=str(out))
    optimizer = build_optimizer(config, model, lr.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    total_steps = total_optimizer_steps(config, len(train_data), plan.effective_batch_size)
    scheduler = build_scheduler(config, optimizer, total_steps)
    eval_batch = plan_eval_batch_size(config, model, train_data, eval_data, collate, plan, state)
    fingerprint = {"model": model_identity(config), "data": data_fingerprint(train_data), "task": config.task,
                   "effective_batch_size": plan.effective_batch_size}
    run = Run(config, accelerator, model, optimizer, scheduler, plan, lr, train_data, eval_data, collate,
              total_steps, eval_batch, AccumulationStats(), fingerprint, out)
    if config.noise_scale:
        run.noise = NoiseMeter(model, accelerator.num_processes, plan.accumulation_steps)
        note = "\n".join(filter(None, [note, run.noise.unavailable]))
    note = "\n".join(filter(None, [note, setup_schedule(run)]))
    note = "\n".join(filter(None, [note, setup_recovery(run, state.device)]))
    text = banner(config, model, state, plan, lr, run.total_steps, accelerator.mixed_precision, eval_batch, note)
    return run, text


def setup_recovery(run: Run, device) -> str | None:
    """Turn OOM recovery on where it is safe; return a line saying why not, or None."""
    from torch.nn.parallel import DistributedDataParallel

    from accum.probe import memory_budget

    config = run.config
    if not config.oom_recovery:
        return None
    if run.accelerator.num_processes > 1:
        if not isinstance(run.model, DistributedDataParallel):
            return "OOM recovery off: several ranks are handled for DDP only (not FSDP or DeepSpeed)"
        if run.noise is not None:
            return "OOM recovery off: --noise-scale on several ranks measures inside DDP's all-reduce"
        run.defer_sync = True
    run.adaptive = AdaptiveBatch(run.plan, config.memory_pressure, config.regrow, config.max_adjustments)
    if config.memory_pressure is not None:
        run.memory_budget = memory_budget(config.max_memory, 0.0, device)
    return None


# ----------------------------------------------------------------------------- batch schedules


def setup_schedule(run: Run) -> str | None:
    """Length in samples (max_samples, or a schedule) and the batch schedule with its LR in samples;
    return the banner lines, or None when neither is asked for. Raises ConfigError (one line)."""
    config, plan = run.config, run.plan
    schedule = schedule_from_config(config)
    if schedule is None and config.max_samples is None:
        return None
    num_samples = len(run.train_data)
    if schedule is None:  # a fixed batch with a sample budget: the LR schedule stays in optimizer steps
        run.total_samples = config.max_samples
        run.total_steps = min(config.max_steps or math.inf, math.ceil(config.max_samples / plan.effective_batch_size))
        run.scheduler = build_scheduler(config, run.optimizer, run.total_steps)
        return f"Length: {run.total_samples} samples"
    run.schedule = schedule.bind(plan.micro_batch_size, plan.num_processes)
    if config.adaptive_batch == "noise":
        if run.noise is None:
            run.noise = NoiseMeter(run.model, plan.num_processes, plan.accumulation_steps)
        if run.noise.unavailable:
            raise ConfigError(f"adaptive batch noise needs the noise scale, which this layout cannot measure "
                              f"({run.noise.unavailable}): use a minimum batch of at least 2 micro-batches")
    if config.max_samples is not None:
        run.total_samples = config.max_samples
    elif config.max_steps is not None:
        try:
            run.total_samples = schedule.simulate(config.max_steps)
        except ValueError:
            raise ConfigError("a noise-driven or token-keyed schedule cannot turn --max-steps into samples for the "
                              "LR schedule: give --max-samples or --epochs") from None
    else:
        run.total_samples = max(1, math.floor((config.epochs or 1.0) * num_samples))
    if config.max_steps is not None:
        run.total_steps = config.max_steps
    else:  # for the progress bar: the windows the schedule takes to reach the budget (at most)
        samples, run.total_steps = 0, 0
        while samples < run.total_samples and run.total_steps < 10**7:
            samples, run.total_steps = samples + schedule.batch_at(samples), run.total_steps + 1
    warmup = config.warmup_steps * schedule.start_batch
    run.scheduler = SampleLR(run.optimizer, config.lr, lr_base_batch(config), config.lr_scaling, config.lr_scheduler,
                             warmup, run.total_samples, schedule.start_batch)
    return "\n".join([schedule.describe(),
                      f"LR schedule in samples: {config.lr_scheduler}, warmup {warmup} samples, over "
                      f"{run.total_samples} samples; LR rule {config.lr_scaling} from batch {lr_base_batch(config)}"])


def next_window_size(run: Run, position: Position) -> int:
    """Samples in the next window: the current effective batch, cut to what is left of a sample budget."""
    if run.total_samples is None:
        return run.plan.effective_batch_size
    return max(1, min(run.plan.effective_batch_size, run.total_samples - position.samples_seen))


def run_finished(run: Run, position: Position) -> bool:
    """Done when the budget in samples is spent (or max_steps reached), else after total_steps."""
    if run.total_samples is None:
        return position.optimizer_step >= run.total_steps
    over_steps = run.config.max_steps is not None and position.optimizer_step >= run.config.max_steps
    return over_steps or position.samples_seen >= run.total_samples


def advance_position(run: Run, position: Position, epoch: int, window_in_epoch: int, indices: list[int]) -> None:
    """Move the data position past the window `indices` (counted on all ranks alike, no collective)."""
    if epoch != position.epoch:
        position.sample_in_epoch = 0
    position.epoch, position.window_in_epoch = epoch, window_in_epoch + 1
    position.sample_in_epoch += len(indices)
    position.samples_seen += len(indices)
    if run.schedule is not None and run.schedule.unit_name == "tokens":
        position.tokens_seen += sum(len(run.train_data[i]["input_ids"]) for i in indices)


def apply_schedule(run: Run, position: Position, record: dict[str, Any]) -> None:
    """After a window: the schedule picks the next window's batch (a change is logged) and the LR
    moves with the samples seen. The record gets the batch it trained with and the LR of the next step."""
    if run.schedule is None:
        return
    record.update(effective_batch_size=run.plan.effective_batch_size,
                  gradient_accumulation_steps=run.plan.accumulation_steps)
    b_simple = run.noise.tracker.b_simple if run.noise is not None else None
    change = run.schedule.decide(Progress(position.optimizer_step, position.samples_seen, position.tokens_seen,
                                          b_simple, loss_items_per_sample(run)))
    if change is not None:
        adopt_batch(run, change, position)
    record["lr"] = run.scheduler.advance(position.samples_seen, run.plan.effective_batch_size)


def adopt_batch(run: Run, change: Change, position: Position) -> None:
    """Train the next windows at `change.new` samples: same micro-batch, new accumulation. Logged on
    the console, in metrics.json (adjustments) and the tracker."""
    old = run.plan
    use_plan(run, plan_batch(change.new, old.micro_batch_size, old.num_processes, source="schedule"))
    lr = run.scheduler.lr_at(position.samples_seen, run.plan.effective_batch_size)
    entry = run.stats.record_adjustment(
        reason=change.reason, optimizer_step=position.optimizer_step, samples_seen=position.samples_seen,
        old_effective_batch_size=old.effective_batch_size, new_effective_batch_size=run.plan.effective_batch_size,
        old_accumulation_steps=old.accumulation_steps, new_accumulation_steps=run.plan.accumulation_steps,
        micro_batch_size=run.plan.micro_batch_size, lr=lr)
    run.accelerator.print(
        f"batch schedule after optimizer step {entry['optimizer_step']} ({entry['samples_seen']} samples): effective "
        f"batch {old.effective_batch_size} -> {run.plan.effective_batch_size}, accumulation {old.accumulation_steps} "
        f"-> {run.plan.accumulation_steps} (micro-batch {run.plan.micro_batch_size}), LR {lr:.4g}: {change.reason}")
    if run.config.report_to != "none":
        run.accelerator.log({"schedule/effective_batch_size": run.plan.effective_batch_size,
                             "schedule/accumulation_steps": run.plan.accumulation_steps, "schedule/lr": lr,
                             "schedule/samples_seen": position.samples_seen}, step=position.optimizer_step)
    if run.accelerator.is_main_process:
        write_json_atomic(run.out / "plan.json", run.plan.to_dict())


def use_plan(run: Run, plan: Plan) -> None:
    """Train the next windows with `plan`; OOM recovery, when on, shrinks from the plan in force."""
    run.plan = plan
    adaptive = getattr(run, "adaptive", None)
    if adaptive is not None:
        adaptive.plan = plan


def schedule_state(run: Run) -> dict[str, Any]:
    """What a checkpoint holds of the batch schedule and the noise scale, so resume continues them."""
    state = {}
    if run.schedule is not None:
        state["schedule"] = run.schedule.state_dict()
    if run.noise is not None:
        state["noise"] = run.noise.tracker.state_dict()
    return state


def restore_schedule(run: Run, state: dict[str, Any], position: Position) -> None:
    """After loading a checkpoint: the schedule's batch, the noise scale, and an LR that follows the rule
    when the batch differs from the checkpoint's (--allow-batch-change; optimizer state holds the old LR)."""
    if run.noise is not None and state.get("noise"):
        run.noise.tracker.load_state_dict(state["noise"])
    if run.schedule is None:
        saved_batch = int(state.get("plan", {}).get("effective_batch_size", run.plan.effective_batch_size))
        if saved_batch != run.plan.effective_batch_size and hasattr(run.scheduler, "lr_lambdas"):
            run.scheduler.base_lrs = [run.lr.lr for _ in run.optimizer.param_groups]
            for group, fn in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas, strict=True):
                group["lr"] = run.lr.lr * fn(run.scheduler.last_epoch)
        return
    if state.get("schedule"):
        run.schedule.load_state_dict(state["schedule"])
    else:  # a fixed-batch checkpoint continued under a schedule: the batch the schedule names here
        run.schedule.decide(Progress(position.optimizer_step, position.samples_seen, position.tokens_seen))
    if run.schedule.batch != run.plan.effective_batch_size:
        use_plan(run, plan_batch(run.schedule.batch, run.plan.micro_batch_size, run.plan.num_processes,
                                 source="schedule"))
    run.scheduler.advance(position.samples_seen, run.plan.effective_batch_size)


def log_step(run: Run, record: dict[str, Any], log: MetricsLog, progress) -> None:
    log.write(record)
    if run.config.report_to != "none":
        run.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["optimizer_step"])
    step = record["optimizer_step"]
    if run.accelerator.is_main_process and (step % run.config.log_every == 0 or step == run.total_steps):
        progress.write(format_step_line(record, run.total_steps))
    progress.update(1)


def train(config: RunConfig, model=None, train_data=None, eval_data=None, cli_keys: set[str] | None = None) -> dict:
    """Fine-tune and evaluate; return the metrics also written to <output_dir>/metrics.json.

    `model`, `train_data` and `eval_data` may be passed in (tokenised: indexable of dicts
    with input_ids and, for classification, labels); otherwise they are built from
    `config`. Raises ConfigError for bad input, before anything is trained; Interrupted after
    SIGTERM/SIGINT (the optimizer step in flight finishes and is saved first).
    """
    with StopRequest() as stop:
        return train_until_done(config, model, train_data, eval_data, cli_keys, stop)


def train_until_done(config: RunConfig, model, train_data, eval_data, cli_keys: set[str] | None,
                     stop: StopRequest) -> dict:
    """train()'s body; `stop` is polled between optimizer steps."""
    run, text = setup(config, cli_keys or set(), model, train_data, eval_data)
    accelerator, position = run.accelerator, Position()
    resumed_step = resume_if_asked(run, position)
    run.saved_step = resumed_step
    run.out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_json_atomic(run.out / "config.json", json.loads(config_to_json(config)))
        write_json_atomic(run.out / "plan.json", run.plan.to_dict())
    accelerator.print(text)
    if config.report_to != "none":
        accelerator.init_trackers("accum", config=tracker_config(config, run.plan, run.lr.lr))
    log = MetricsLog(run.out / "metrics.jsonl", accelerator.is_main_process, resumed_step)
    windows = iterate_windows(len(run.train_data), lambda: next_window_size(run, position), config.seed, position)
    progress = tqdm(total=run.total_steps, initial=position.optimizer_step, desc="optimizer steps",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    started = time.perf_counter()
    while not run_finished(run, position):
        at_step_boundary(run, stop, position)
        epoch, window_in_epoch, indices = next(windows)
        record = run_window(run, indices, position)
        position.optimizer_step += 1
        advance_position(run, position, epoch, window_in_epoch, indices)
        record.update(optimizer_step=position.optimizer_step, micro_step=position.micro_step, epoch=epoch)
        apply_schedule(run, position, record)
        log_step(run, record, log, progress)
        if config.eval_every and position.optimizer_step % config.eval_every == 0 and run.eval_data:
            accelerator.print(f"eval at step {position.optimizer_step}: {run_eval(run)}")
        if config.save_every and position.optimizer_step % config.save_every == 0:
            save(run, position)
    progress.close()
    train_seconds = time.perf_counter() - started
    save(run, position)
    eval_metrics = run_eval(run) if run.eval_data else {}
    metrics = final_metrics(run.stats, run.plan, eval_metrics, train_seconds, run.lr)
    if run.noise is not None:
        metrics.update(noise_summary(run))
        accelerator.print(describe_noise(metrics))
    if accelerator.is_main_process:
        write_json_atomic(run.out / "metrics.json", metrics)
    accelerator.print("final: " + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    release_collectives(accelerator)
    accelerator.end_training()
    return metrics


def release_collectives(accelerator) -> None:
    """Let gloo's worker threads drop their last collectives before the process group is torn down.

    Each finished collective is released on a gloo worker thread, and releasing its tensors needs
    the GIL. If the main thread destroys the process group first (it holds the GIL while joining
    those threads), both wait forever: seen at exit in about 1 of 8 two-rank CPU runs (torch 2.13,
    py-spy: ~ProcessGroupGloo joining a thread stuck in ~AsyncAllgatherWork). A barrier, then a
    short sleep that releases the GIL, lets the workers finish.
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)


def run_eval(run: Run) -> dict[str, float]:
    """Evaluate; with OOM recovery, an OOM halves the eval batch alone (training's plan is untouched)."""
    while True:
        metrics = evaluate_model(run.accelerator, run.model, run.eval_data, run.collate, run.config, run.eval_batch,
                                 recover=run.adaptive is not None)
        if metrics is not None:
            return metrics
        free_memory()
        if run.eval_batch == 1:
            raise OutOfMemoryError(advice("evaluation", run.stats.optimizer_step, 1))
        old, run.eval_batch = run.eval_batch, run.eval_batch // 2
        run.stats.record_adjustment(reason="out of memory in evaluation", old_eval_batch_size=old,
                                    new_eval_batch_size=run.eval_batch)
        run.accelerator.print(f"adjusted at optimizer step {run.stats.optimizer_step}: eval batch {old} -> "
                              f"{run.eval_batch} (out of memory in evaluation; training's micro-batch unchanged)")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        config, cli_keys = parse_config(argv)
        train(config, cli_keys=cli_keys)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OutOfMemoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except FloatingPointError as exc:
        print(f"error: {exc}. Lower --lr, or pass --skip-nonfinite, then --resume-from-checkpoint latest",
              file=sys.stderr)
        return 3
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, read-only, quota: the complete checkpoints are untouched
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: I/O failed{where}: {exc.strerror or exc}; free space or choose another --output-dir, then "
              "--resume-from-checkpoint latest (complete checkpoints are kept)", file=sys.stderr)
        return 5
    except RuntimeError as exc:
        if not lost_another_rank(exc):
            raise
        print(f"error: lost contact with another rank ({str(exc).splitlines()[0][:200]}); every rank stopped. "
              "Resume with --resume-from-checkpoint latest; --dist-timeout-s bounds this wait", file=sys.stderr)
        return 6
    return 0


def lost_another_rank(exc: RuntimeError) -> bool:
    """A collective failed because a peer died or timed out (gloo/NCCL raise RuntimeError subclasses)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "timed out", "connection closed", "connection reset"))


if __name__ == "__main__":
    sys.exit(main())
