"""Fine-tune a transformers model with exact gradient accumulation.

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train.py --config configs/default.yaml
    python scripts/train.py --config configs/clm_tiny.yaml --max-steps 20

Setup (config -> data, model, plan, accelerator, accumulator) is apart from the loop. The loop
reads top to bottom: take the next window's samples from the sampler, let `accum.Accumulator`
run it (one exact optimizer step: item counts agreed over ranks, loss sums scaled, sync on the
window's last micro-batch, clipping, OOM replay; accum/window.py), then log, follow the batch
schedule, evaluate and save. Nothing of the window's arithmetic lives here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `scripts` and `accum` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    def _stop_at_once(signum, frame):  # noqa: ARG001 - a signal handler's signature
        """Until train() installs its own handling (importing torch alone takes seconds): one line and
        128 + the signal, never a traceback; nothing of ours is half-written (every write is atomic)."""
        import signal

        os.write(2, f"error: stopped by {signal.Signals(signum).name}\n".encode())
        os._exit(128 + signum)

    import signal as _signal

    for _signum in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(_signum, _stop_at_once)

import torch
from tqdm.auto import tqdm

from accum.accelerator import build_accelerator
from accum.cache import PlanCache
from accum.cli import data as data_lib
from accum.cli import rundir
from accum.cli import status as status_lib
from accum.cli.config import (
    INT64_MAX,
    ConfigError,
    RunConfig,
    config_to_json,
    parse_config,
    show_library_warnings,
)
from accum.cli.lock import OutputLock
from accum.cli.models import quiet_loading
from accum.cli.planning import (
    apply_sparse_embedding_grads,
    build_optimizer,
    check_launch_environment,
    check_precision,
    load_run_inputs,
    lr_base_batch,
    make_plan,
    model_identity,
    plan_eval_batch_size,
    resolve_batch_flags,
    resolve_precision,
    token_cut,
    verify_command,
)
from accum.cli.status import STATUS_FILE, ExitStatus, write_status
from accum.files import atomic_directory, write_json_atomic, write_text_atomic
from accum.loss import TaskLoss
from accum.plan import Plan, plan_from_accumulation, replan
from accum.prefetch import Prefetcher
from accum.recovery import AdaptiveBatch, OutOfMemoryError
from accum.scaling import ScaledLR, scale_lr
from accum.schedule import BatchSchedule, Change, Progress, SampleLR, schedule_from_config
from accum.sharded import engine_of, oom_recovery_unavailable
from accum.signals import Interrupted, Stopped, StopRequest
from accum.window import Accumulator, Callback, NonFiniteError, WindowResult, evaluate
from accum.windows import WindowSampler, windows_per_epoch
from scripts import checkpoint as ckpt

# ----------------------------------------------------------------------------- setup


def check_output_dir(config: RunConfig) -> Path:
    """Refuse a directory another live run owns (its lock), one holding an earlier run's results unless
    asked to continue or overwrite it, one where the run could write only after training, and one
    where nothing can be written. Creates nothing (train creates the directory once every input is
    checked): bad input touches no file."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output dir {str(out)!r} exists and is not a directory: choose another --output-dir")
    OutputLock(out).check()  # reads only
    rundir.check_layout(out)
    results = rundir.results_in(out) if out.is_dir() else []
    if results and not config.overwrite and not config.resume_from_checkpoint:
        what = "a finished run" if "metrics.json" in results else f"an earlier run's {', '.join(results[:-1])} and {results[-1]}" if len(results) > 1 \
            else f"an earlier run's {results[0]}"
        raise ConfigError(f"output dir {str(out)!r} holds {what}: pass --resume-from-checkpoint latest to continue "
                          f"it, --overwrite to start again (its files move to {rundir.OVERWRITTEN_PREFIX}<time>/ "
                          "inside it), or another --output-dir")
    existing = next(parent for parent in (out, *out.absolute().parents) if parent.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a parent is not a directory")
        with tempfile.TemporaryFile(dir=existing):  # the one real test of writability (root ignores modes)
            pass
    except OSError as exc:
        raise ConfigError(f"output dir {str(out)!r} cannot be written ({exc.strerror}): choose another --output-dir") from None
    return out


def check_batch_within_data(config: RunConfig, target: int, num_samples: int) -> None:
    """A window never holds more samples than the data: a larger batch would be claimed in the banner
    and the metrics while each step trained only the data's samples. Raises ConfigError."""
    schedule = schedule_from_config(config)
    batches = [("batch_size", target)]
    if schedule is not None and schedule.kind == "steps":
        batches = [("accumulation_schedule", max(batch for _, batch in schedule.points))]
    elif schedule is not None and schedule.kind == "ramp":
        batches = [("batch_ramp", max(schedule.start, schedule.end))]
    elif schedule is not None:  # noise-driven, up to adaptive_batch_max (default 8 x the minimum)
        batches = [("adaptive_batch_min", schedule.minimum), ("adaptive_batch_max", schedule.maximum)]
    for name, batch in batches:
        if batch > num_samples:
            raise ConfigError(f"`{name}` {batch} is larger than the {num_samples} training samples: every step "
                              f"would train only {num_samples}; use at most {num_samples}, or more data")


def data_fingerprint(dataset) -> str:
    """Cheap identity of a tokenised data set: size and the first and last samples' tokens."""
    first, last = dataset[0], dataset[len(dataset) - 1]
    blob = json.dumps([len(dataset), list(first["input_ids"]), list(last["input_ids"])])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_scheduler(config: RunConfig, optimizer, total_steps: int):
    """An LR schedule in optimizer steps. Not passed to accelerator.prepare: Accelerate would step it
    once per process per optimizer step (docs/architecture.md: LR 0.70 on one process, 0.40 on two)."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


@dataclass(frozen=True)
class Length:
    """How long the run is, worked out once: optimizer steps (for the progress bar and an LR schedule
    in steps) and, when a sample budget or a batch schedule sets it, samples."""

    total_steps: int
    total_samples: int | None = None
    description: str | None = None  # banner lines


def resolve_length(config: RunConfig, num_samples: int, plan: Plan, schedule: BatchSchedule | None) -> Length:
    """max_steps, epochs x windows per epoch, a sample budget, or the windows a batch schedule takes
    to spend its budget. Raises ConfigError when a schedule cannot turn steps into samples."""
    if schedule is None and config.max_samples is None:
        if config.max_steps is not None:
            return Length(config.max_steps)
        per_epoch = windows_per_epoch(num_samples, plan.effective_batch_size)
        steps = (config.epochs or 1.0) * per_epoch
        if not steps < INT64_MAX:  # 1e308 epochs overflow to inf: no schedule or counter can hold them
            raise ConfigError(f"`epochs` {config.epochs:g} x {per_epoch} windows per epoch is more optimizer steps "
                              "than fit in 64 bits: lower `epochs`, or give `max_steps`")
        return Length(max(1, math.ceil(steps)))
    if schedule is None:  # a fixed batch with a sample budget: the LR schedule stays in optimizer steps
        steps = min(config.max_steps or math.inf, math.ceil(config.max_samples / plan.effective_batch_size))
        return Length(steps, config.max_samples, f"Length: {config.max_samples} samples")
    if config.max_samples is not None:
        samples = config.max_samples
    elif config.max_steps is not None:
        try:
            samples = schedule.simulate(config.max_steps)
        except ValueError:
            raise ConfigError("a noise-driven or token-keyed schedule cannot turn --max-steps into samples for the "
                              "LR schedule: give --max-samples or --epochs") from None
    else:
        samples = max(1, math.floor((config.epochs or 1.0) * num_samples))
    if config.max_steps is not None:
        steps = config.max_steps
    else:  # for the progress bar: the windows the schedule takes to reach the budget (at most)
        seen, steps = 0, 0
        while seen < samples and steps < 10**7:
            seen, steps = seen + schedule.batch_at(seen), steps + 1
    return Length(steps, samples)


def build_lr_schedule(config: RunConfig, optimizer, length: Length, schedule: BatchSchedule | None):
    """(scheduler, banner lines): steps-based for a fixed batch; in samples under a batch schedule,
    so warmup and decay stay where they were meant to be when the batch changes."""
    if schedule is None:
        return build_scheduler(config, optimizer, length.total_steps), length.description
    warmup = config.warmup_steps * schedule.start_batch
    scheduler = SampleLR(optimizer, config.lr, lr_base_batch(config), config.lr_scaling, config.lr_scheduler,
                         warmup, length.total_samples, schedule.start_batch)
    return scheduler, "\n".join([
        schedule.describe(),
        f"LR schedule in samples: {config.lr_scheduler}, warmup {warmup} samples, over "
        f"{length.total_samples} samples; LR rule {config.lr_scaling} from batch {lr_base_batch(config)}"])


def banner(config: RunConfig, model, accelerator, plan: Plan, lr: ScaledLR, total_steps: int,
           eval_batch: int, note: str | None) -> str:
    params = sum(p.numel() for p in model.parameters())
    lines = [
        f"Model: {model_identity(config)} ({config.task}), {params / 1e6:.1f}M parameters",
        f"Device: {accelerator.device} x {accelerator.num_processes} process"
        f"{'es' if accelerator.num_processes > 1 else ''}, precision {accelerator.mixed_precision}",
        f"Optimizer: {config.optimizer}, LR {lr.describe()}, schedule {config.lr_scheduler}, "
        f"warmup {config.warmup_steps} steps",
        f"Length: {total_steps} optimizer steps; eval "
        + (f"token budget {eval_batch:,}" if plan.cut == "tokens" else f"batch {eval_batch}") + " per process",
        f"Loss normalisation: {config.resolved_loss_normalization()}",
        plan.banner(),
    ]
    if note:
        lines.append(note)
    return "\n".join(lines)


@dataclass(frozen=True)
class Run:
    """The resolved run, built once by `setup` and never reassigned: what the banner prints and what
    the loop drives. What changes while training lives in `TrainingState`."""

    config: RunConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    plan: Plan  # as planned; the plan in force is accumulator.plan
    lr: ScaledLR
    train_data: Any
    eval_data: Any
    collate: Any
    loss: TaskLoss
    length: Length
    fingerprint: dict
    out: Path
    accumulator: Accumulator
    schedule: BatchSchedule | None  # the effective batch changes between windows (accum/schedule.py)
    tokenizer: Any = None  # the one that made the data; None when the data was handed in tokenised


@dataclass
class TrainingState:
    """What moves while training: the data position (sampler), the counters and noise scale (the
    accumulator's state), the batch schedule's, and the eval batch; `state_dict()` for checkpoints."""

    sampler: WindowSampler
    accumulator: Accumulator
    schedule: BatchSchedule | None
    eval_batch: int
    saved_step: int | None = None  # the optimizer step this process last checkpointed (or resumed from)
    run_id: str | None = None  # the run that owns the output directory (accum/cli/rundir.py)
    window_start: dict | None = field(default=None, repr=False)  # the state before the window in flight

    @property
    def optimizer_step(self) -> int:
        return self.accumulator.stats.optimizer_step

    def state_dict(self, counters: dict | None = None) -> dict[str, Any]:
        stats = self.accumulator.stats.state_dict()
        stats.update(counters or {})
        state = {key: stats[key] for key in ("optimizer_step", "micro_step", "samples_seen", "tokens_seen")}
        state.update({key: value for key, value in self.sampler.state_dict().items()
                      if key in ("epoch", "window_in_epoch", "sample_in_epoch")}, stats=stats)
        if self.accumulator.noise is not None:
            state["noise"] = self.accumulator.noise.tracker.state_dict()
        if self.schedule is not None:
            state["schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's state; raises ValueError for a state that does not fit."""
        sampler = dict(self.sampler.state_dict())
        sampler.update({key: state[key] for key in ("epoch", "window_in_epoch", "sample_in_epoch")})
        self.sampler.load_state_dict(sampler)
        self.accumulator.load_state_dict({"stats": state["stats"], "noise": state.get("noise")})
        if self.schedule is not None and state.get("schedule"):
            self.schedule.load_state_dict(state["schedule"])


@contextlib.contextmanager
def stopping_in(stop: StopRequest | None, phase: str, accelerator=None):
    """While a phase before training runs: a signal is reported as stopping this phase, and the library's
    Stopped (its `should_stop()` said so) becomes Interrupted naming it (nothing trained or saved). With
    `accelerator`, every rank raised Stopped together and learns which signal it was (one all-reduce)."""
    if stop is not None:
        stop.phase = phase
    try:
        yield
    except Stopped:
        raise Interrupted(agreed_signal(stop, accelerator), phase=phase) from None


def agreed_signal(stop: StopRequest, accelerator=None) -> int:
    """The signal that stopped a library loop: this rank's, or any rank's (a collective) with `accelerator`."""
    import signal

    signum = stop.agreed(accelerator) if accelerator is not None else stop.signum
    return signum or signal.SIGTERM  # a loop stops only when some rank got one


def stop_point(stop: StopRequest | None, accelerator, phase: str) -> None:
    """A point every rank passes: stop here if any rank got SIGTERM/SIGINT (one all-reduce with several)."""
    signum = stop.agreed(accelerator) if stop is not None else None
    if signum is not None:
        raise Interrupted(signum, phase=phase)


def setup(config: RunConfig, cli_keys: set[str], model, train_data, eval_data,
          callbacks: tuple[Callback, ...] = (), stop: StopRequest | None = None) -> tuple[Run, TrainingState, str]:
    """Everything before the loop: output dir, data, model, plan, accelerator, optimizer, schedule,
    accumulator. Returns the run, its starting state and the banner text. Raises ConfigError, and
    Interrupted when `stop` got a signal (data preparation and planning stop at their next safe point:
    between stages, before each probe; with several processes where all ranks agree)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Accelerator() honours ACCELERATE_USE_CPU but PartialState() does not (accelerate 1.15): without
    # this, each CPU rank of `accelerate launch --multi_gpu` would train alone as a world of one.
    # a bounded wait: a rank whose peer died stops with an error instead of hanging (gloo's default is 30 min)
    check_launch_environment()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(seconds=config.dist_timeout_s))
    check_precision(config, state.device)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > state.num_processes:
        raise ConfigError(f"{launched} processes were launched but each sees a world of {state.num_processes}: "
                          "on a machine without GPUs, launch with ACCELERATE_USE_CPU=1")
    torch.manual_seed(config.seed)
    resolved = resolve_batch_flags(config, cli_keys, state.num_processes)
    out = check_output_dir(config)
    alone, local_stop = state.num_processes == 1, stop.requested if stop is not None else None
    with stopping_in(stop, "data preparation"):  # with several ranks only at the agreed point below
        inputs = load_run_inputs(config, model, train_data, eval_data, should_stop=local_stop if alone else None)
    if config.compile:  # before planning: the planner then probes the compiled steps the run will take
        inputs = dataclasses.replace(inputs, model=compile_model(inputs.model))
    model, train_data, eval_data, collate, loss = (inputs.model, inputs.train_data, inputs.eval_data, inputs.collate,
                                                   inputs.loss)
    check_batch_within_data(config, resolved[0], len(train_data))
    # the accumulation steps of this Accelerator are set per window (begin_window), so it can exist
    # before the plan: the planner then probes on the run's device and process count
    accelerator = build_accelerator(plan_from_accumulation(1, 1), mixed_precision=resolve_precision(config),
                                    log_with=config.report_to, project_dir=str(out))
    stop_point(stop, accelerator, "data preparation")
    sparse_note = apply_sparse_embedding_grads(config, model, accelerator)
    with stopping_in(stop, "planning", accelerator):
        plan, note = make_plan(config, resolved, accelerator, inputs, verify_command=verify_command(config, inputs),
                               resumed=ckpt.plan_to_resume(config.output_dir, config.resume_from_checkpoint),
                               should_stop=local_stop)
    lr = scale_lr(config.lr, lr_base_batch(config), plan.effective_batch_size, config.lr_scaling)
    optimizer = build_optimizer(config, model, lr.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = schedule_from_config(config)
    if schedule is not None:
        # a fixed split needs batches the micro-batch divides; balanced and token plans any of the processes'
        schedule.bind(plan.micro_batch_size if plan.cut == "samples" else 1, plan.num_processes)
    length = resolve_length(config, len(train_data), plan, schedule)
    scheduler, schedule_note = build_lr_schedule(config, optimizer, length, schedule)
    with stopping_in(stop, "planning", accelerator):
        eval_batch = plan_eval_batch_size(config, model, train_data, eval_data, collate, plan, accelerator,
                                          should_stop=local_stop)
    stop_point(stop, accelerator, "planning")
    accumulator = build_accumulator(config, accelerator, model, optimizer, scheduler, plan, loss, collate, callbacks)
    if config.adaptive_batch == "noise" and accumulator.noise.unavailable:
        raise ConfigError(f"adaptive batch noise needs the noise scale, which this layout cannot measure "
                          f"({accumulator.noise.unavailable}): use a minimum batch of at least 2 micro-batches")
    fingerprint = {"model": model_identity(config), "data": data_fingerprint(train_data), "task": config.task,
                   "effective_batch_size": plan.effective_batch_size}
    run = Run(config, accelerator, model, optimizer, scheduler, plan, lr, train_data, eval_data, collate, loss,
              length, fingerprint, out, accumulator, schedule, inputs.tokenizer)
    sampler = WindowSampler(len(train_data), plan.effective_batch_size, seed=config.seed)
    note = "\n".join(filter(None, [*inputs.notes, note, sparse_note, *accumulator.notes, schedule_note]))
    text = banner(config, model, accelerator, plan, lr, length.total_steps, eval_batch, note)
    if stop is not None:
        stop.phase = "training"
    return run, TrainingState(sampler, accumulator, schedule, eval_batch), text


def compile_model(model):
    """torch.compile with dynamic shapes: micro-batches cut by length differ in shape from window to
    window, and a static compile would recompile for each new one. The backend is inductor, or what
    the accelerate config names (ACCELERATE_DYNAMO_BACKEND, set by `accelerate launch`)."""
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "inductor").lower()
    return torch.compile(model, backend="inductor" if backend in ("no", "") else backend, dynamic=True)


def build_accumulator(config: RunConfig, accelerator, model, optimizer, scheduler, plan: Plan, loss: TaskLoss,
                      collate, callbacks) -> Accumulator:
    """The window object with this run's clipping, recovery, noise scale and non-finite policy."""
    from accum.probe import memory_budget

    recovery: bool | AdaptiveBatch = False
    budget = None
    # on by default, but not where it cannot work (FSDP on several ranks, DeepSpeed): off then, said in
    # one line; asked for explicitly there, the Accumulator refuses to start, in one line
    unavailable = oom_recovery_unavailable(engine_of(accelerator, model), accelerator.num_processes)
    asked = config.oom_recovery and (unavailable is None or "oom_recovery" in config.model_fields_set)
    if asked:
        recovery = AdaptiveBatch(plan, config.memory_pressure, config.regrow, config.max_adjustments)
        if config.memory_pressure is not None:
            budget = memory_budget(config.max_memory, 0.0, accelerator.device)
    accumulator = Accumulator(accelerator, model, optimizer, plan, loss=loss, collate=collate, scheduler=scheduler,
                              max_grad_norm=config.max_grad_norm, recovery=recovery, memory_budget=budget,
                              noise_scale=config.noise_scale or config.adaptive_batch == "noise",
                              nonfinite="skip" if config.skip_nonfinite else "raise", callbacks=callbacks,
                              cut=token_cut(config, plan))
    if config.oom_recovery and not asked:
        accumulator.notes.append(f"OOM recovery off: {unavailable}")
    return accumulator


# ----------------------------------------------------------------------------- the loop


def train(config: RunConfig, model=None, train_data=None, eval_data=None, cli_keys: set[str] | None = None,
          callbacks: tuple[Callback, ...] = ()) -> dict:
    """Fine-tune and evaluate; return the metrics also written to <output_dir>/metrics.json.

    `model`, `train_data` and `eval_data` may be passed in (tokenised: indexable of dicts
    with input_ids and, for classification, labels); otherwise they are built from
    `config`. `callbacks` receive the accumulator's events (accum.window.Callback) and, if they
    define it, `on_evaluate(run)` before each evaluation. Raises ConfigError for bad input, before
    anything is trained; Interrupted after SIGTERM/SIGINT (the optimizer step in flight finishes
    and is saved first).
    """
    with StopRequest() as stop:
        run, state, text = setup(config, cli_keys or set(), model, train_data, eval_data, tuple(callbacks), stop)
        lock = OutputLock(run.out)
        resumed_step = resume_if_asked(run, state)  # a checkpoint that cannot be used touches nothing
        on_main_process(run, lock.acquire)  # before anything is written
        try:
            claim_output_dir(run, state, resumed_step)
            metrics = train_until_done(run, state, text, stop, tuple(callbacks), resumed_step)
        except BaseException as exc:
            end_run(run, lock, exc)
            raise
        end_run(run, lock, None, metrics)
        return metrics


def on_main_process(run: Run, action) -> None:
    """`action()` on the main process only (the output directory's lock); every rank learns whether
    it refused the run (one broadcast) and raises the same ConfigError, with nothing written."""
    from accelerate.utils import broadcast_object_list

    refusal = [None]
    if run.accelerator.is_main_process:
        try:
            action()
        except ConfigError as exc:
            refusal = [str(exc)]
    if run.accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise ConfigError(refusal[0])


def claim_output_dir(run: Run, state: TrainingState, resumed_step: int | None) -> None:
    """Once the lock is held, before anything is written: a fresh run gets a new id (the same on every
    rank) and, under --overwrite, the earlier run's files move aside first; leftovers of writers killed
    mid-write are removed (they may hold the space a full disk needs); run.json names the owner."""
    from accelerate.utils import broadcast_object_list

    from accum.files import remove_stale_temporaries

    if state.run_id is None:
        agreed = [rundir.new_run_id()]
        if run.accelerator.num_processes > 1:
            broadcast_object_list(agreed)
        state.run_id = agreed[0]
    if not run.accelerator.is_main_process:
        return
    if resumed_step is None and run.config.overwrite:
        moved = rundir.move_aside(run.out)
        if moved is not None:
            print(f"note: --overwrite: the earlier run's files moved to {moved}", file=sys.stderr, flush=True)
    ckpt.remove_leftovers(run.out)
    for name in rundir.RUN_OUTPUTS:  # this run holds the lock: a temporary beside its files is a dead writer's
        remove_stale_temporaries(run.out, name, older_than_s=0)
    rundir.write_run_file(run.out, state.run_id)


def end_run(run: Run, lock: OutputLock, failure: BaseException | None, metrics: dict | None = None) -> None:
    """status.json (how the run ended, its one-line reason, its metrics) and the lock released. A run
    refused as bad input writes no status over an earlier run's (its status and metrics stay)."""
    if not lock.held:
        return
    code, reason = exit_status_of(failure) if failure is not None else (ExitStatus.OK, None)
    earlier = (run.out / STATUS_FILE).exists() or (run.out / "metrics.json").exists()
    try:
        if code != ExitStatus.BAD_INPUT or not earlier:
            write_status(run.out, code, reason, metrics)
    except OSError:
        pass  # a full disk: the exit code still says how the run ended
    finally:
        lock.release()


def train_until_done(run: Run, state: TrainingState, text: str, stop: StopRequest, callbacks,
                     resumed_step: int | None) -> dict:
    """train()'s body once the output directory is this run's; `stop` is polled between optimizer steps."""
    accelerator, config = run.accelerator, run.config
    state.saved_step = resumed_step
    if accelerator.is_main_process:
        write_json_atomic(run.out / "config.json", json.loads(config_to_json(config)))
        write_json_atomic(run.out / "plan.json", run.accumulator.plan.to_dict())
    accelerator.print(text)
    if config.report_to != "none":
        accelerator.init_trackers("accum", config=tracker_config(config, run.plan, run.lr.lr),
                                  init_kwargs=tracker_resume_kwargs(config, resumed_step))
    log = MetricsLog(run.out / "metrics.jsonl", accelerator.is_main_process, resumed_step)
    progress = tqdm(total=run.length.total_steps, initial=state.optimizer_step, desc="optimizer steps",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    started, started_cpu = time.perf_counter(), time.process_time()
    prefetch = Prefetcher(run.accumulator.prepare, run.train_data, config.num_workers if run.schedule is None else 0)
    with contextlib.closing(progress):  # closed before an error line is printed, not after it
        try:
            while not run_finished(run, state):
                at_step_boundary(run, state, stop)
                indices = state.sampler.next_window(next_window_size(run, state))
                window = prefetch.take(indices)
                if not run_finished_after(run, state, len(indices)):
                    prefetch.ahead(state.sampler.peek_window(next_window_size(run, state, len(indices))))
                result = train_window(run, state, window)
                step_done(run, state, result, log, progress, callbacks, stop)
        finally:
            prefetch.close()
    train_seconds = time.perf_counter() - started
    # this process's CPU seconds (all its threads): on a shared machine they move less than wall seconds
    train_cpu_seconds = time.process_time() - started_cpu
    path = save(run, state)
    eval_metrics = run_eval(run, state, callbacks, stop) if run.eval_data else {}
    signum = stop.agreed(accelerator)  # after the last evaluation: the run is whole but not reported finished
    if signum is not None:
        raise Interrupted(signum, state.optimizer_step, path, phase="evaluation")
    metrics = final_metrics(run, state, eval_metrics, train_seconds)
    metrics.update(train_cpu_seconds=round(train_cpu_seconds, 3), data_wait_seconds=round(prefetch.waited, 4),
                   data_wait_fraction=round(prefetch.waited / train_seconds, 4) if train_seconds > 0 else None)
    if run.accumulator.noise is not None:
        metrics.update(noise_summary(run))
        accelerator.print(describe_noise(metrics))
    final = export_final(run, metrics)  # before metrics.json, which marks the run done
    metrics["final_model_dir"] = None if final is None else str(final)
    if accelerator.is_main_process:
        write_json_atomic(run.out / "metrics.json", metrics)
    accelerator.print("final: " + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    release_collectives(accelerator)
    accelerator.end_training()
    return metrics


def step_done(run: Run, state: TrainingState, result: WindowResult, log, progress, callbacks,
              stop: StopRequest | None = None) -> None:
    """After a window: log it, follow the batch schedule, evaluate and save when due."""
    config = run.config
    record = step_record(run, state, result)
    follow_schedule(run, state, result)
    log_step(run, record, log, progress)
    if config.eval_every and state.optimizer_step % config.eval_every == 0 and run.eval_data:
        run.accelerator.print(f"eval at step {state.optimizer_step}: {run_eval(run, state, callbacks, stop)}")
    if config.save_every and state.optimizer_step % config.save_every == 0:
        save(run, state)


def train_window(run: Run, state: TrainingState, window) -> WindowResult:
    """One optimizer step on `window` (its samples, or the Accumulator's prepared window). A window
    refused as non-finite, or out of memory at micro-batch 1, saves the state before it first, so
    that a resume replays it."""
    saved = []
    run.accumulator.on_give_up = lambda: saved.append(save_last_good(run, state))
    try:
        result = run.accumulator.step(window)
    except NonFiniteError as exc:
        # refused before the step: the weights are the last step's, verified finite then; saved with this
        # window's counters rolled back. Made non-finite by the step: nothing in memory is worth saving.
        saved = None if exc.weights_changed else save_last_good(run, state)
        good = last_finite_checkpoint(run, state)
        if good is not None and good == saved:
            where, resume = f"the state before it is saved as {good}", "then --resume-from-checkpoint latest"
        elif good is not None:
            where, resume = (f"the last checkpoint verified finite is {good}",
                             f"then --resume-from-checkpoint {good}")
        else:
            where, resume = "no checkpoint of this run is verified finite", "then start again"
        raise FloatingPointError(f"{exc}; {where}. Lower --lr, or pass --skip-nonfinite, {resume}") from None
    except OutOfMemoryError as exc:
        if not saved:
            raise
        raise OutOfMemoryError(f"{exc}; then --resume-from-checkpoint latest") from None
    if result.skipped and result.skip_reason != "fp16 overflow":
        run.accelerator.print(f"skipped optimizer step {result.optimizer_step}: {result.skip_reason} (--skip-nonfinite)")
    for decision in result.adjustments:
        report_adjustment(run, decision)
    return result


def step_record(run: Run, state: TrainingState, result: WindowResult) -> dict[str, Any]:
    """The metrics.jsonl line of a window: the accumulator's record plus the epoch, the layout it ran
    with and the noise scale."""
    plan = run.accumulator.plan
    return dict(result.record, epoch=state.sampler.epoch, effective_batch_size=plan.effective_batch_size,
                micro_batch_size=result.micro_batch_size, gradient_accumulation_steps=result.micro_batches,
                noise_b_simple=result.b_simple)


def next_window_size(run: Run, state: TrainingState, ahead: int = 0) -> int:
    """Samples in the next window (after `ahead` more samples): the current effective batch, cut to
    what is left of a sample budget."""
    batch = run.accumulator.plan.effective_batch_size
    if run.length.total_samples is None:
        return batch
    return max(1, min(batch, run.length.total_samples - state.accumulator.stats.samples_seen - ahead))


def run_finished_after(run: Run, state: TrainingState, samples: int) -> bool:
    """Whether the run ends with the window in flight (of `samples` samples): nothing to prepare."""
    if run.length.total_samples is None:
        return state.optimizer_step + 1 >= run.length.total_steps
    over_steps = run.config.max_steps is not None and state.optimizer_step + 1 >= run.config.max_steps
    return over_steps or state.accumulator.stats.samples_seen + samples >= run.length.total_samples


def run_finished(run: Run, state: TrainingState) -> bool:
    """Done when the budget in samples is spent (or max_steps reached), else after total_steps."""
    if run.length.total_samples is None:
        return state.optimizer_step >= run.length.total_steps
    over_steps = run.config.max_steps is not None and state.optimizer_step >= run.config.max_steps
    return over_steps or state.accumulator.stats.samples_seen >= run.length.total_samples


def report_adjustment(run: Run, decision) -> None:
    """An OOM replay or memory-pressure change: console, tracker, plan.json and the plan cache (so
    that the next run starts from the safe plan). The accumulator has recorded it in its stats."""
    run.accelerator.print(f"adjusted from optimizer step {decision.optimizer_step}: {decision.describe()}")
    if run.config.report_to != "none":
        run.accelerator.log({"adjustment/micro_batch_size": decision.new.micro_batch_size,
                             "adjustment/accumulation_steps": decision.new.accumulation_steps},
                            step=decision.optimizer_step)
    if run.accelerator.is_main_process:
        write_json_atomic(run.out / "plan.json", run.accumulator.plan.to_dict())
        if run.plan.cache_key is not None:  # a probed plan: the next run with these inputs starts safe
            PlanCache(run.config.plan_cache).put(run.plan.cache_key, run.accumulator.plan.to_dict())


def follow_schedule(run: Run, state: TrainingState, result: WindowResult) -> None:
    """After a window: the batch schedule picks the next window's batch (a change is logged) and an LR
    schedule in samples moves with the samples seen."""
    if run.schedule is None:
        return
    stats = state.accumulator.stats
    b_simple = result.b_simple
    change = run.schedule.decide(Progress(stats.optimizer_step, stats.samples_seen, stats.tokens_seen,
                                          b_simple, loss_items_per_sample(run)))
    if change is not None:
        adopt_batch(run, state, change)
    run.scheduler.advance(stats.samples_seen, run.accumulator.plan.effective_batch_size)


def adopt_batch(run: Run, state: TrainingState, change: Change) -> None:
    """Train the next windows at `change.new` samples: same micro-batch, new accumulation. Logged on
    the console, in metrics.json (adjustments) and the tracker."""
    old = run.accumulator.plan
    new = dataclasses.replace(replan(old, target_batch_size=change.new), source="schedule")
    run.accumulator.use_plan(new)
    stats = state.accumulator.stats
    lr = run.scheduler.lr_at(stats.samples_seen, new.effective_batch_size)
    entry = stats.record_adjustment(
        reason=change.reason, optimizer_step=stats.optimizer_step, samples_seen=stats.samples_seen,
        old_effective_batch_size=old.effective_batch_size, new_effective_batch_size=new.effective_batch_size,
        old_accumulation_steps=old.accumulation_steps, new_accumulation_steps=new.accumulation_steps,
        micro_batch_size=new.micro_batch_size, lr=lr)
    run.accelerator.print(
        f"batch schedule after optimizer step {entry['optimizer_step']} ({entry['samples_seen']} samples): effective "
        f"batch {old.effective_batch_size} -> {new.effective_batch_size}, accumulation {old.accumulation_steps} "
        f"-> {new.accumulation_steps} (micro-batch {new.micro_batch_size}), LR {lr:.4g}: {change.reason}")
    if run.config.report_to != "none":
        run.accelerator.log({"schedule/effective_batch_size": new.effective_batch_size,
                             "schedule/accumulation_steps": new.accumulation_steps, "schedule/lr": lr,
                             "schedule/samples_seen": stats.samples_seen}, step=stats.optimizer_step)
    if run.accelerator.is_main_process:
        write_json_atomic(run.out / "plan.json", new.to_dict())


# metrics.jsonl fields that are not curves: the step is the x axis, the epoch and the skip flag are not measured
NOT_TRACKED = frozenset({"optimizer_step", "epoch", "skipped"})


def tracked_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line a tracker plots over optimizer steps."""
    return {key: value for key, value in record.items()
            if key not in NOT_TRACKED and isinstance(value, (int, float)) and not isinstance(value, bool)}


def log_step(run: Run, record: dict[str, Any], log: MetricsLog, progress) -> None:
    log.write(record)
    if run.config.report_to != "none":
        run.accelerator.log(tracked_scalars(record), step=record["optimizer_step"])
    step = record["optimizer_step"]
    if run.accelerator.is_main_process and (step % run.config.log_every == 0 or step == run.length.total_steps):
        progress.write(format_step_line(record, run.length.total_steps))
    progress.update(1)


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


def run_eval(run: Run, state: TrainingState, callbacks=(), stop: StopRequest | None = None) -> dict[str, float]:
    """Loss and task metric on the eval set, shared across ranks without duplicated samples; with OOM
    recovery an OOM halves the eval batch alone (training's plan is untouched). A signal stops it at the
    next batch (on several ranks at its end): the state is saved first, then Interrupted is raised."""
    from accelerate.utils import gather_object

    for callback in callbacks:
        getattr(callback, "on_evaluate", lambda run: None)(run)
    classification = run.config.task == "classification"

    def predictions(batch, logits):
        return logits.argmax(-1).tolist(), batch["labels"].tolist()

    def shrunk(old: int, new: int) -> None:
        stats = state.accumulator.stats
        stats.record_adjustment(reason="out of memory in evaluation", old_eval_batch_size=old, new_eval_batch_size=new)
        run.accelerator.print(f"adjusted at optimizer step {stats.optimizer_step}: eval batch {old} -> {new} "
                              "(out of memory in evaluation; training's micro-batch unchanged)")

    try:
        if stop is not None:
            stop.phase = "evaluation"
        result = evaluate(run.accelerator, run.model, run.eval_data, run.collate, run.loss, state.eval_batch,
                          cut=token_cut(run.config, run.plan),
                          recovery=run.config.oom_recovery, on_batch=predictions if classification else None,
                          on_shrink=shrunk, should_stop=stop.requested if stop is not None else None)
    except Stopped:
        signum = agreed_signal(stop, run.accelerator)
        raise Interrupted(signum, state.optimizer_step, save(run, state), phase="evaluation") from None
    finally:
        if stop is not None:
            stop.phase = "training"
    state.eval_batch = result.batch_size
    preds = [p for batch_preds, _ in result.outputs for p in batch_preds]
    refs = [r for _, batch_refs in result.outputs for r in batch_refs]
    if classification:
        preds, refs = gather_object(preds), gather_object(refs)
    return data_lib.compute_eval_metrics(run.config.task, preds, refs, result.loss)


# ----------------------------------------------------------------------------- reporting


class MetricsLog:
    """metrics.jsonl, one line per optimizer step, appended and flushed by the main process."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            # resume: drop lines of steps after the checkpoint, which will be run again (atomically: a
            # kill here must not lose the lines kept)
            with open(path) as handle:
                kept = [line.rstrip("\n") for line in handle if 0 < _logged_step(line) <= keep_until_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
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
            f"grad_norm {grad if grad is None else round(grad, 4)} tok/s {record.get('tokens_per_s') or 0:.0f}")


def tracker_config(config: RunConfig, plan: Plan, lr: float) -> dict[str, Any]:
    """Scalars only (TensorBoard's hparams reject the rest)."""
    flat = {k: v for k, v in config.model_dump().items() if isinstance(v, (int, float, str, bool))}
    flat.update(effective_batch_size=plan.effective_batch_size, gradient_accumulation_steps=plan.accumulation_steps,
                micro_batch_size=plan.micro_batch_size, num_processes=plan.num_processes, scaled_lr=lr)
    return flat


def tracker_resume_kwargs(config: RunConfig, resumed_step: int | None) -> dict[str, Any]:
    """After a resume, TensorBoard hides what the interrupted run logged past the checkpoint (steps that
    are trained again), instead of showing those steps twice: `purge_step` is the first step logged again."""
    if resumed_step is None or config.report_to != "tensorboard":
        return {}
    return {"tensorboard": {"purge_step": resumed_step + 1}}


def final_metrics(run: Run, state: TrainingState, eval_metrics: dict, train_seconds: float) -> dict[str, Any]:
    plan = run.accumulator.plan
    summary = state.accumulator.stats.as_dict()
    summary.update(eval=eval_metrics, plan=plan.to_dict(), train_seconds=round(train_seconds, 3), lr=run.lr.lr,
                   effective_batch_size=plan.effective_batch_size, micro_batch_size=plan.micro_batch_size,
                   gradient_accumulation_steps=plan.accumulation_steps, num_processes=plan.num_processes)
    return summary


def noise_summary(run: Run) -> dict[str, Any]:
    """The smoothed noise-scale estimates for metrics.json, B_simple also in samples: the tracker works
    in loss items, which are tokens under token-weighted normalisation."""
    noise = run.accumulator.noise
    summary = noise.tracker.as_dict()
    tokens = run.config.resolved_loss_normalization() == "tokens"
    b_simple = summary["noise_b_simple"]
    summary.update(noise_items="tokens" if tokens else "samples", noise_method=noise.method,
                   noise_min_updates=noise.tracker.min_updates,
                   noise_b_simple_samples=None if b_simple is None else b_simple / loss_items_per_sample(run))
    return summary


def loss_items_per_sample(run: Run) -> float:
    """Loss items per sample seen so far: tokens per sample under token-weighted normalisation (the unit
    B_simple is measured in then), else 1."""
    stats = run.accumulator.stats
    if run.config.resolved_loss_normalization() == "tokens" and stats.samples_seen:
        return stats.tokens_seen / stats.samples_seen
    return 1.0


def describe_noise(metrics: dict[str, Any]) -> str:
    """The final noise-scale line: B_simple against the effective batch trained with, or which of its
    conditions is not met yet."""
    b_simple = metrics.get("noise_b_simple")
    if metrics.get("noise_method") is None:
        return "noise scale: not measured (one process with accumulation 1; see the note at the start)"
    if b_simple is None:
        updates, needed = metrics["noise_updates"], metrics.get("noise_min_updates", 10)
        if updates < needed:
            return f"noise scale: not known after {updates} measured steps (it needs {needed}): train longer"
        return (f"noise scale: not known after {updates} measured steps: the estimate of |G|^2, the mean gradient's "
                f"squared norm, is {metrics['noise_g_sq']:.3g}, not positive yet (at an effective batch of "
                f"{metrics['effective_batch_size']} the gradient's noise still hides its mean): train longer or "
                "with a larger batch")
    in_samples = "" if metrics["noise_items"] == "samples" else f" = {metrics['noise_b_simple_samples']:.1f} samples"
    return (f"noise scale: B_simple {b_simple:.0f} {metrics['noise_items']}{in_samples} after {metrics['noise_updates']} steps (effective batch {metrics['effective_batch_size']}); "
            "`python -m accum recommend --run <output_dir>` suggests a batch")


# ----------------------------------------------------------------------------- the final model

AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification", "clm": "AutoModelForCausalLM"}


def export_final(run: Run, metrics: dict[str, Any]) -> Path | None:
    """<output_dir>/final/ in transformers' save_pretrained layout: config.json, model.safetensors, the
    tokenizer that made the data, and a model card (README.md) with the run's plan and metrics, so that
    `AutoModelFor...from_pretrained(<output_dir>/final)` loads it offline. Written atomically: a kill
    leaves the previous export or none. All ranks call it (the state dict is gathered, as FSDP needs);
    the main process writes. Returns the directory (None for a model handed to train() that is not a
    transformers model: it has no save_pretrained). Raises OSError when a write fails."""
    from accelerate.utils import DistributedType

    accelerator = run.accelerator
    if not hasattr(accelerator.unwrap_model(run.model), "save_pretrained"):
        return None
    path = run.out / rundir.FINAL_DIR
    # sharded weights are gathered on every rank; otherwise the unwrapped model's own state dict is whole
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dict = accelerator.get_state_dict(run.model) if sharded else None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.model, keep_torch_compile=False)
        with atomic_directory(path) as tmp, quiet_loading():  # no "Writing model shards" progress bar
            model.save_pretrained(tmp, state_dict=state_dict)
            if run.tokenizer is not None:
                run.tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(run, metrics))
    accelerator.wait_for_everyone()
    accelerator.print(f"final model: {path} (from_pretrained loads it)")
    return path


def model_card(run: Run, metrics: dict[str, Any]) -> str:
    """A short README.md for the export: what was trained, how (the plan), how well, how to load it."""
    config, plan = run.config, run.accumulator.plan
    model = run.accelerator.unwrap_model(run.model)
    auto = AUTO_CLASSES[config.task]
    evals = ", ".join(f"{key} {value:.4g}" for key, value in metrics.get("eval", {}).items()) or "no evaluation"
    final, ema = (f"{v:.4g}" if isinstance(v, (int, float)) else "-" for v in (metrics["final_loss"], metrics["ema_loss"]))
    items = config.resolved_loss_normalization()
    weighting = (f"the loss is normalised over the {items} of each whole window, so each step's gradient is the "
                 "full batch's" if items != "mean" else "the loss is Accelerate's mean of micro-batch means "
                 "(--loss-normalization mean)")
    lines = [
        "---", "library_name: transformers", f"tags: [accum, {config.task}]", "---", "",
        f"# {config.model or 'A ' + str(model.config.model_type) + ' built from model_config_overrides'}, "
        f"fine-tuned with accum ({config.task})", "",
        f"- Effective batch: {plan.banner().split(': ', 1)[1]} (plan: {plan.source}); {weighting}",
        f"- Trained: {metrics['optimizer_step']} optimizer steps, {metrics['samples_seen']} samples, "
        f"{metrics['tokens_seen']} tokens; optimizer {config.optimizer}, LR {run.lr.describe()}, "
        f"schedule {config.lr_scheduler}, seed {config.seed}",
        f"- Final training loss {final} (EMA {ema}); eval: {evals}",
    ]
    if metrics.get("noise_b_simple") is not None:
        lines.append(f"- Gradient noise scale B_simple: {metrics['noise_b_simple']:.4g} {metrics['noise_items']}")
    if metrics.get("adjustments"):
        lines.append(f"- Plan adjustments during the run: {len(metrics['adjustments'])} (see ../metrics.json)")
    tokenizer = ("AutoTokenizer.from_pretrained(path)" if run.tokenizer is not None
                 else "None  # the data was handed to train() tokenised: no tokenizer was saved")
    lines += ["", "## Load", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
              f'path = "{run.out / rundir.FINAL_DIR}"', f"model = {auto}.from_pretrained(path)", f"tokenizer = {tokenizer}",
              "```", "", "The run's resolved config, plan and metrics are in the directory above this one "
              "(config.json, plan.json, metrics.json, metrics.jsonl).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_state(run: Run, state: TrainingState, counters: dict | None = None,
                     sampler: dict | None = None) -> dict[str, Any]:
    """state.json of a checkpoint: the training state (with `counters` and `sampler` position rolled
    back to a window's start, for the last good state), the fingerprint, plan and config."""
    payload = state.state_dict(counters)
    if sampler is not None:
        payload.update({key: sampler[key] for key in ("epoch", "window_in_epoch", "sample_in_epoch")})
    payload.update(fingerprint=run.fingerprint, plan=run.accumulator.plan.to_dict(),
                   config=json.loads(config_to_json(run.config)), run_id=state.run_id)
    return payload


def save(run: Run, state: TrainingState, payload: dict | None = None, rng: dict | None = None) -> Path:
    """Checkpoint on all ranks; return its directory. A step this process already saved (or resumed
    from) is not written again: rewriting it would open a window where a kill loses it."""
    payload = payload or checkpoint_state(run, state)
    step = payload["optimizer_step"]
    if state.saved_step == step:
        return ckpt.checkpoint_root(run.config.output_dir) / f"step-{step:08d}"
    path = ckpt.save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler, payload,
                                run.config.output_dir, run.config.keep_checkpoints, rng_tensors=rng)
    state.saved_step = step
    run.accelerator.print(f"saved checkpoint {path}")
    return path


def at_step_boundary(run: Run, state: TrainingState, stop: StopRequest) -> None:
    """Between two optimizer steps: stop if any rank got SIGTERM/SIGINT (saving first, raising
    Interrupted), else remember the state before the next window, for a refused window to save."""
    signum = stop.agreed(run.accelerator)
    if signum is not None:
        path = save(run, state)
        raise Interrupted(signum, state.optimizer_step, path)
    stats = state.accumulator.stats
    state.window_start = {"sampler": state.sampler.state_dict(), "rng": ckpt.rng_state(),
                          "counters": {key: getattr(stats, key) for key in ("micro_step", "samples_seen", "tokens_seen")}}


def save_last_good(run: Run, state: TrainingState) -> Path:
    """Checkpoint the state before the window in flight (weights and optimizer are untouched by it:
    it never stepped), with that window's counters, position and RNG rolled back, so resuming replays it."""
    start = state.window_start
    payload = checkpoint_state(run, state, counters=start["counters"], sampler=start["sampler"])
    return save(run, state, payload, rng=start["rng"])


def last_finite_checkpoint(run: Run, state: TrainingState) -> Path | None:
    """The newest checkpoint of this run whose weights and optimizer state are read back and are all
    finite (each is checked before it is named), or None."""
    for path in reversed(ckpt.list_checkpoints(run.out, state.run_id)):
        if ckpt.verified_finite(path):
            return path
    return None


def resume_if_asked(run: Run, state: TrainingState) -> int | None:
    """Load the checkpoint named by --resume-from-checkpoint; return its optimizer step (None: fresh start)."""
    config = run.config
    if not config.resume_from_checkpoint:
        return None
    owner = rundir.read_run_id(run.out)
    path = ckpt.resolve_checkpoint(config.output_dir, config.resume_from_checkpoint, owner)
    saved = ckpt.read_state(path)
    checkpoint_run = rundir.owner_of_checkpoint(saved)
    if owner is not None and checkpoint_run is not None and checkpoint_run != owner:
        raise ConfigError(f"checkpoint {str(path)!r} is of run {checkpoint_run}, not of run {owner} that owns "
                          f"{str(run.out)!r} (run.json; an --overwrite started it): resume from one of its checkpoints "
                          "or start again")
    check_fingerprint(saved.get("fingerprint", {}), run.fingerprint, config.allow_batch_change, path)
    loaded = ckpt.load_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler, path,
                                  require_rng=not config.resume_without_rng)
    if not (path / f"rng-rank{run.accelerator.process_index}.safetensors").is_file():
        print(f"note: {path} has no RNG state for rank {run.accelerator.process_index}: resuming without it "
              "(--resume-without-rng); the run is not bit-identical to an uninterrupted one", file=sys.stderr)
    state.run_id = checkpoint_run or owner
    try:
        state.load_state_dict(loaded)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"checkpoint {str(path)!r} holds a state this run cannot continue ({exc}); "
                          "resume from another checkpoint or start again") from None
    restore_batch(run, state, loaded)
    run.accelerator.print(f"resumed from {path} at optimizer step {state.optimizer_step}")
    return state.optimizer_step


def restore_batch(run: Run, state: TrainingState, saved: dict[str, Any]) -> None:
    """After loading a checkpoint: the schedule's batch, and an LR that follows the rule when the batch
    differs from the checkpoint's (--allow-batch-change; the optimizer state holds the old LR)."""
    stats = state.accumulator.stats
    if run.schedule is None:
        saved_batch = int(saved.get("plan", {}).get("effective_batch_size", run.plan.effective_batch_size))
        if saved_batch != run.plan.effective_batch_size and hasattr(run.scheduler, "lr_lambdas"):
            run.scheduler.base_lrs = [run.lr.lr for _ in run.optimizer.param_groups]
            for group, fn in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas, strict=True):
                group["lr"] = run.lr.lr * fn(run.scheduler.last_epoch)
        return
    if not saved.get("schedule"):  # a fixed-batch checkpoint continued under a schedule: the batch it names here
        run.schedule.decide(Progress(stats.optimizer_step, stats.samples_seen, stats.tokens_seen))
    if run.schedule.batch != run.accumulator.plan.effective_batch_size:
        run.accumulator.use_plan(dataclasses.replace(replan(run.plan, target_batch_size=run.schedule.batch),
                                            source="schedule"))
    run.scheduler.advance(stats.samples_seen, run.accumulator.plan.effective_batch_size)


def check_fingerprint(saved: dict, current: dict, allow_batch_change: bool, path: Path) -> None:
    """A checkpoint of another model, data set or effective batch is refused (ConfigError)."""
    for key in ("model", "data", "task"):
        if saved.get(key) != current[key]:
            raise ConfigError(f"checkpoint {str(path)!r} is from another {key} ({saved.get(key)!r}, now "
                              f"{current[key]!r}): resume with the run's own config or start a new --output-dir")
    if saved.get("effective_batch_size") != current["effective_batch_size"] and not allow_batch_change:
        raise ConfigError(f"checkpoint {str(path)!r} trained with effective batch {saved.get('effective_batch_size')}, "
                          f"now {current['effective_batch_size']}: keep --batch-size or pass --allow-batch-change")


# ----------------------------------------------------------------------------- command line


IO_FIX = "free space or choose another --output-dir, then --resume-from-checkpoint latest (complete checkpoints are kept)"


def exit_status_of(exc: BaseException) -> tuple[ExitStatus, str]:
    """How an exception ends a run: its exit status and one line saying what happened and what to do
    (accum.cli.status.exit_status_of, with this script's advice for a failed write)."""
    return status_lib.exit_status_of(exc, io_fix=IO_FIX)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: every failure is one `error:` line on stderr and a documented exit code
    (accum.cli.status.ExitStatus), never a traceback unless --debug asks for it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_library_warnings()
    try:
        config, cli_keys = parse_config(argv)
        train(config, cli_keys=cli_keys)
    except BaseException as exc:  # noqa: BLE001 - every failure is one line and an exit code
        return status_lib.report_failure(exc, status_lib.DEBUG_FLAG in argv, io_fix=IO_FIX)
    return ExitStatus.OK


if __name__ == "__main__":
    sys.exit(main())
