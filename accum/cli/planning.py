"""Planning for a run config: what scripts/train.py and `python -m accum plan --config` share.

From a RunConfig and the run's Accelerator: resolve the batch flags (any two of batch, micro-batch
and accumulation), build the probe's worst-case batches, probe (accum.probe.plan_for) or take the
plan from the flags, verify it in a fresh process when asked, size the evaluation batch, and work
out the LR for the planned batch. The sweep resolves its runs' batch and LR with the same functions.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from accum.cli.config import RunConfig
from accum.errors import ConfigError
from accum.loss import TaskLoss
from accum.plan import Plan, plan_from_accumulation, resolve_batch
from accum.scaling import scale_lr
from accum.schedule import schedule_from_config


def check_launch_environment(environ: Any = None) -> None:
    """The variables a launcher sets, checked before Accelerate reads them (it would raise a traceback,
    or show 'precision fp17'): whole numbers for the process layout, a precision Accelerate knows.
    Raises ConfigError naming the variable."""
    from accelerate.utils import PrecisionType

    environ = os.environ if environ is None else environ
    for name, minimum in (("WORLD_SIZE", 1), ("LOCAL_WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        value = environ.get(name)
        if value is not None and not (value.strip().isdigit() and int(value) >= minimum):
            raise ConfigError(f"environment variable {name}={value!r} must be a whole number >= {minimum}: launchers "
                              "set it; unset it, or start the run with `accelerate launch`")
    precision = environ.get("ACCELERATE_MIXED_PRECISION")
    if precision is not None and precision.lower() not in {p.value for p in PrecisionType}:
        raise ConfigError(f"environment variable ACCELERATE_MIXED_PRECISION={precision!r} is not a precision: use "
                          "no, fp16 or bf16 (the accelerate config's mixed_precision sets it), or unset it")


def check_precision(config: RunConfig, device: Any) -> str:
    """The precision the run will train in (`mixed_precision`, else the accelerate config's through
    ACCELERATE_MIXED_PRECISION, else no). Raises ConfigError for fp16 on the CPU: Accelerate has no
    fp16 gradient scaler there and trains in fp32, while reporting fp16."""
    precision = resolve_precision(config)
    source = "`mixed_precision`"
    if precision is None:
        precision, source = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(), "the accelerate config"
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ConfigError(f"fp16 (from {source}) on the CPU: Accelerate has no fp16 gradient scaler there and "
                          "would train in fp32 while reporting fp16; use `mixed_precision` bf16 or no")
    return precision


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


def worst_case_examples(dataset, count: int, seq_len: int) -> list[dict]:
    """`count` samples of full length `seq_len`, for probing memory at the longest batch training can meet."""
    example = dict(dataset[0])
    ids = list(example["input_ids"]) or [0]
    example["input_ids"] = (ids * (seq_len // len(ids) + 1))[:seq_len]
    return [dict(example) for _ in range(count)]


def move_to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


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


def longest_sample(dataset) -> int:
    """Tokens in the longest sample of a tokenised data set (0 when it is empty)."""
    column = dataset["input_ids"] if hasattr(dataset, "column_names") else (row["input_ids"] for row in dataset)
    return max((len(ids) for ids in column), default=0)


def probe_length(config: RunConfig, model, train_ds=None) -> int:
    """Tokens per probed sample: the longest sample the data has (after tokenization), within
    max_seq_len and the model's positions; the probe plans for the longest batch training can meet,
    not for a limit the data never reaches."""
    model_config = getattr(model, "module", model).config  # DDP-wrapped after prepare() on several ranks
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    length = min(config.max_seq_len, limit) if limit else config.max_seq_len
    if train_ds is not None and len(train_ds):
        length = min(length, max(1, longest_sample(train_ds)))
    return length


def plan_cut(config: RunConfig, micro_batch_size: int | None) -> str:
    """How windows are cut: by tokens (auto micro-batch and cut_by tokens or unset), balanced equal
    parts (auto and cut_by samples), or fixed parts (a given micro-batch). Raises ConfigError for
    cut_by tokens with a given micro-batch (the token budget is what probing finds)."""
    if micro_batch_size is not None:
        if config.cut_by == "tokens":
            raise ConfigError("`cut_by` tokens needs `micro_batch_size` auto: the token budget is probed")
        return "samples"
    return "balanced" if config.cut_by == "samples" else "tokens"


def probe_batch_maker(config: RunConfig, model, train_ds, collate, device):
    """make_batch(n) for the planner: n samples of the worst-case length."""
    length = probe_length(config, model, train_ds)

    def make_batch(n: int) -> dict[str, torch.Tensor]:
        return move_to(collate(worst_case_examples(train_ds, n, length)), device)

    return make_batch


def plan_eval_batch_size(config: RunConfig, model, train_ds, eval_ds, collate, plan: Plan, accelerator,
                         should_stop: Callable[[], bool] | None = None) -> int:
    """--eval-batch-size, or the largest forward-only batch that fits, probed from the training
    micro-batch up to 8 times it (no gradients or optimizer state, so it is larger). Under a token
    plan the answer is a token budget of its own: the batch x the probed length (a given batch: x the
    longest eval sample, so that N samples of the eval data's longest make one batch)."""
    from accum.probe import plan_eval_batch

    tokens = plan.cut == "tokens"
    length = probe_length(config, model, train_ds)
    if config.eval_batch_size != "auto":
        longest = probe_length(config, model, eval_ds) if eval_ds else length
        return config.eval_batch_size * longest if tokens else config.eval_batch_size
    if not eval_ds:  # nothing to evaluate: no probes (they cost as much as a training step or two)
        return plan.micro_batch_size * length if tokens else plan.micro_batch_size
    per_process = math.ceil(len(eval_ds) / accelerator.num_processes)
    limit = max(1, min(8 * plan.micro_batch_size, per_process))
    start = min(plan.micro_batch_size, limit)
    result = plan_eval_batch(model, probe_batch_maker(config, model, train_ds, collate, accelerator.device),
                             accelerator, limit=limit, start=start, max_memory=config.max_memory,
                             safety_margin=config.safety_margin, progress=False, should_stop=should_stop)
    return result.size * length if tokens else result.size


@dataclass(frozen=True)
class RunInputs:
    """What a run config builds before anything is planned: the model (on the CPU, in train mode),
    the tokenised data, the collate, the loss, whether the model and data came from the config
    (a fresh process can then rebuild them, as plan verification does), the tokenizer that made the
    data (None when the data was handed in tokenised) and lines for the banner (a new head)."""

    model: Any
    train_data: Any
    eval_data: Any
    collate: Any
    loss: TaskLoss
    from_config: bool
    tokenizer: Any = None
    notes: tuple[str, ...] = ()


def load_run_inputs(config: RunConfig, model=None, train_data=None, eval_data=None,
                    should_stop: Callable[[], bool] | None = None) -> RunInputs:
    """Tokenizer, data and model from `config`, unless given (tokenised samples: indexable of dicts with
    input_ids and, for classification, labels). Seed torch first: the weights of a model built from a
    config come from its RNG. `should_stop()` is asked between the stages (tokenizer, files, tokenising,
    model). Raises ConfigError, accum.signals.Stopped."""
    from accum.cli import data, models
    from accum.signals import Stopped

    def stage_done(what: str) -> None:
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped after {what}")

    tokenizer, label_info, from_config = None, None, model is None and train_data is None
    notes: list[str] = []
    if train_data is None:
        tokenizer = models.build_tokenizer(config)
        stage_done("loading the tokenizer")
        train_raw, eval_raw = data.load_splits(config)
        stage_done("reading the data")
        train_data, eval_data, label_info = data.tokenize_splits(config, tokenizer, train_raw, eval_raw)
        stage_done("tokenising")
    if model is None:
        model = models.build_model(config, label_info.num_labels if label_info else 0, tokenizer=tokenizer,
                                   id2label=label_info.id2label if label_info else None, notes=notes)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    model.train()
    return RunInputs(model, train_data, eval_data, data.make_collate(config.task, pad_id),
                     TaskLoss(config.task, config.resolved_loss_normalization()), from_config, tokenizer, tuple(notes))


def make_plan(config: RunConfig, resolved, accelerator, inputs: RunInputs,
              verify_command: list[str] | None = None, resumed: Plan | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[Plan, str | None]:
    """Micro-batch x accumulation x processes for the target batch: from flags, the plan of the
    checkpoint being resumed (`resumed`: the same cut, so the resumed run is bit-identical), or by
    probing memory (then, with --verify-plan, checked in a fresh process). `should_stop()` is asked
    before each probe and while a verification child runs. Returns (plan, banner note); raises
    accum.signals.Stopped."""
    import dataclasses

    from accum.probe import plan_for

    target, micro, accum, note = resolved
    cut = plan_cut(config, micro)
    if micro is not None and accum is not None:
        return plan_from_accumulation(micro, accum, accelerator.num_processes), note
    if (resumed is not None and resumed.cut == cut and resumed.num_processes == accelerator.num_processes
            and resumed.target_batch_size == target):
        return dataclasses.replace(resumed, source="checkpoint", probes=()), note
    model, loss = inputs.model, inputs.loss

    def loss_fn(probe_model, batch):
        return loss.forward(probe_model, batch)[0] / batch["labels"].numel()

    optimizer = build_optimizer(config, model, config.lr)
    make_batch = probe_batch_maker(config, model, inputs.train_data, inputs.collate, accelerator.device)
    plan = plan_for(accelerator, model, make_batch, target, optimizer, loss_fn=loss_fn, max_memory=config.max_memory,
                    safety_margin=config.safety_margin, objective=config.objective, cache_path=config.plan_cache,
                    replan=config.replan, allow_rounding=config.allow_batch_rounding,
                    progress=accelerator.is_main_process, cut=cut,
                    sequence_length=probe_length(config, model, inputs.train_data), should_stop=should_stop)
    del optimizer
    if config.verify_plan and not plan.verified_steps >= config.verify_plan:
        if verify_command is None:
            raise ConfigError("`verify_plan` rebuilds the model and data in a fresh process: give them by the "
                              "config (model and data files), not as objects")
        plan = verify_plan(plan, config, accelerator, model, verify_command, cache_path=config.plan_cache,
                           should_stop=should_stop)
    return plan, note


def apply_sparse_embedding_grads(config: RunConfig, model, accelerator) -> str | None:
    """Sparse row gradients for the model's embedding tables where `sparse_embedding_grads` allows
    (accum.embeddings), before planning so the probes measure the run's backward. Returns the
    banner's line, or None when no table changed. Raises ConfigError for `true` where it cannot work."""
    from accum.embeddings import SparseEmbeddingGrads, use_sparse_embedding_grads
    from accum.sharded import engine_of

    on, why = use_sparse_embedding_grads(config.sparse_embedding_grads, accelerator.num_processes,
                                         engine_of(accelerator, model), compiled=bool(config.compile),
                                         device_type=torch.device(getattr(accelerator, "device", "cpu")).type)
    if config.sparse_embedding_grads is True and not on:
        raise ConfigError(f"--sparse-embedding-grads true cannot work here: {why}; use auto or false")
    if not on:
        return None
    sparse = SparseEmbeddingGrads(model)
    if not sparse.names:
        return None
    return (f"Sparse embedding gradients: {', '.join(sparse.names)} ({sparse.parameters / 1e6:.1f}M values; "
            "--sparse-embedding-grads false for dense)")


def token_cut(config: RunConfig, plan: Plan):
    """The cut by length with this run's charge per micro-batch (`micro_batch_overhead_tokens`) when the
    plan cuts by tokens, else None (the caller's default cut for the plan)."""
    from accum.windows import TokenBudget

    return TokenBudget(overhead_tokens=config.micro_batch_overhead_tokens) if plan.cut == "tokens" else None


FUSED_DEVICES = ("cpu", "cuda")  # where torch has the fused AdamW kernel (torch.optim.AdamW, fused=True)


def use_fused_adamw(setting: bool | str, params: list[torch.nn.Parameter]) -> bool:
    """Whether AdamW runs torch's fused kernel: `setting` true or false as given; "auto": when every
    trained parameter is a float tensor on a device torch has the kernel for. The fused kernel updates
    all parameters in one pass instead of several small ops per tensor: on a 2-core CPU, MiniLM's step
    took 17 ms fused against 119 ms (docs/architecture.md); the update is the same to rounding."""
    if setting != "auto":
        return bool(setting)
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


def build_optimizer(config: RunConfig, model, lr: float) -> torch.optim.Optimizer:
    """torch AdamW (fused where it can be, `fused_optimizer`)/SGD, or bitsandbytes' 8-bit AdamW/Lion
    (which run on CPU too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        fused = use_fused_adamw(config.fused_optimizer, params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, fused=fused or None)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    import bitsandbytes as bnb

    if config.optimizer == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=config.weight_decay)
    return bnb.optim.Lion8bit(params, lr=lr, weight_decay=config.weight_decay)


def resolve_batch_and_lr(config: RunConfig, num_processes: int = 1) -> tuple[int, float]:
    """(target effective batch, LR for it) as train.py resolves them before planning: the schedule's
    first batch when a schedule is on, the LR scaled by the run's rule from `lr_base_batch`.
    Raises ConfigError as train.py would."""
    target = resolve_batch_flags(config, set(), num_processes)[0]
    return target, scale_lr(config.lr, lr_base_batch(config), target, config.lr_scaling).lr


# -- verification in a fresh process ------------------------------------------------------------------


def check_steps_fit(accelerator, model, optimizer, make_batch, loss_fn, size: int, steps: int,
                    max_memory, safety_margin: float) -> dict[str, Any]:
    """Train `steps` steps back to back at micro-batch `size` in this process, measured as the planner
    measures (accum.oom): {"size", "steps", "fit", "peak_bytes", "budget_bytes", "error"}. Fit means no
    out-of-memory error and a peak within the budget."""
    from accum.oom import free_memory, is_oom, measured_peak, start_peak_measurement
    from accum.probe import format_bytes, make_train_step, memory_budget

    budget = memory_budget(max_memory, safety_margin, accelerator.device)
    step = make_train_step(model, make_batch, accelerator, optimizer, loss_fn, steps=steps)
    free_memory()
    baseline = start_peak_measurement(accelerator.device)
    error = None
    try:
        step(size)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)
    except Exception as exc:  # noqa: BLE001 - only OOMs are a verdict, below
        if not is_oom(exc):
            raise
        error = "out of memory"
    peak = measured_peak(accelerator.device, baseline)
    if error is None and budget is not None and peak > budget:
        error = f"over budget: peak {format_bytes(peak)} > {format_bytes(budget)}"
    return {"size": size, "steps": steps, "fit": error is None, "peak_bytes": peak, "budget_bytes": budget,
            "error": error}


def _child_env(device: torch.device) -> dict[str, str]:
    """This process's environment for a verification child: no process-group variables (it runs
    alone), and on CUDA only this rank's GPU."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                          "MASTER_PORT", "TORCHELASTIC_RUN_ID") and not key.startswith("ACCELERATE_DISTRIBUTED")}
    if device.type == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(device.index if device.index is not None else torch.cuda.current_device())
    return env


def _fits_in_fresh_process(command: list[str], size: int, steps: int, device: torch.device,
                           should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """Run the verification child and return its verdict; `should_stop()` is polled while it runs: the
    child is then stopped and None returned (the caller makes the ranks agree on stopping)."""
    import time

    full = [*command, "--micro-batch-size", str(size), "--steps", str(steps)]
    with subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(device),
                          start_new_session=True) as child:  # its own group: our Ctrl-C is ours to pass on
        deadline = time.monotonic() + 3600
        while True:
            try:
                stdout, stderr = child.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if (should_stop is not None and should_stop()) or time.monotonic() > deadline:
                    child.terminate()
                    child.communicate()
                    if time.monotonic() > deadline:
                        raise ConfigError("plan verification ran for an hour: run `python -m accum verify` by "
                                          "hand to see why") from None
                    return None
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if child.returncode not in (0, 4) or not lines:
        reason = (stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1][:300]
        raise ConfigError(f"plan verification could not run ({reason}): run `python -m accum verify` by hand to see why")
    return json.loads(lines[-1])


def verify_plan(plan: Plan, config: RunConfig, accelerator, model, command: list[str],
                cache_path: Any = None, should_stop: Callable[[], bool] | None = None) -> Plan:
    """Check `plan` by `config.verify_plan` training steps back to back in a fresh process (`command` is
    `python -m accum verify ...` for this workload), stepping the micro-batch down (about 5% at a time)
    until they fit; all ranks agree after each check. The model moves to the CPU meanwhile, so the
    child has the device to itself. Returns the verified plan (also written to the plan cache);
    raises NothingFitsError when micro-batch 1 does not fit, accum.signals.Stopped when `should_stop()`
    said so on any rank (the child is stopped)."""
    import dataclasses

    from accum.cache import PlanCache
    from accum.oom import free_memory
    from accum.plan import plan_batch
    from accum.probe import NothingFitsError
    from accum.recovery import agree_max
    from accum.signals import Stopped

    steps, device = config.verify_plan, torch.device(accelerator.device)
    checks, current = [], plan
    model.to("cpu")
    free_memory()
    try:
        for _attempt in range(12):
            result = _fits_in_fresh_process(command, current.micro_batch_size, steps, device, should_stop)
            failed, stopped = (value > 0 for value in agree_max([0.0 if result and result["fit"] else 1.0,
                                                                  float(result is None)], device))
            if stopped:
                raise Stopped("stopped while verifying the plan")
            checks.append({**result, "fit": not failed, "verify": True})
            if accelerator.is_main_process:
                verdict = "fits" if not failed else f"does not fit ({result.get('error') or 'another rank'})"
                print(f"verify: micro-batch {current.micro_batch_size} x {steps} steps in a fresh process {verdict}",
                      file=sys.stderr, flush=True)
            if not failed:
                verified = dataclasses.replace(current, verified_steps=steps, probes=(*plan.probes, *checks),
                                               cache_key=plan.cache_key, source=plan.source)
                if plan.cache_key and cache_path is not False and accelerator.is_main_process:
                    PlanCache(cache_path).put(plan.cache_key, verified.to_dict())
                return verified
            if current.micro_batch_size == 1:
                break
            smaller = max(1, min(current.micro_batch_size - 1, math.floor(current.micro_batch_size * 0.95)))
            current = plan_batch(plan.target_batch_size, smaller, plan.num_processes,
                                 allow_rounding=config.allow_batch_rounding, source=plan.source)
    finally:
        model.to(device)
    raise NothingFitsError(f"no micro-batch trains {steps} steps in a fresh process (down to "
                           f"{current.micro_batch_size}): raise `max_memory`, shorten the sequences, or turn on "
                           "`gradient_checkpointing`")


def verify_command(config: RunConfig, inputs: RunInputs) -> list[str] | None:
    """`python -m accum verify --config <this resolved config>`: a fresh process that rebuilds this run's
    model and data; None when they were handed in as objects (nothing can rebuild them)."""
    if not inputs.from_config:
        return None
    import tempfile

    from accum.cli.config import config_to_json

    handle, path = tempfile.mkstemp(prefix="accum-verify-", suffix=".json")
    with os.fdopen(handle, "w") as file:
        file.write(config_to_json(config))
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))
    return [sys.executable, "-m", "accum", "verify", "--config", path]
