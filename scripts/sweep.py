"""Sweep accumulation settings: one training process per run, a results table and plots.

    python scripts/sweep.py --config configs/sweep.yaml            # `make sweep`
    python scripts/sweep.py --config configs/sweep_split.yaml --dry-run

A sweep YAML names a base run config and the runs to derive from it:

- kind: scaling  effective batch = k x base_batch_size for each k, the LR scaled by each rule,
                 and (with budget_samples) the same number of samples for every run, so that
                 larger batches take fewer optimizer steps;
- kind: split    one effective batch split as several (micro, accumulation) pairs;
- kind: grid     any RunConfig keys as axes (their product, or `search: {method: random, trials: N}`).

`variants` (named sets of overrides) are crossed with the runs of any kind: e.g. a fixed batch
against a schedule at the same sample budget.

Each run gets <output_dir>/<run>/ with its own resolved run_config.yaml, train.log and the
files train.py writes; it runs as `python -m accelerate.commands.launch --config_file <accelerate
config> scripts/train.py --config <run>/run_config.yaml`. A run that fails (or runs out of memory)
is recorded with its error and the others go on. <output_dir>/results.jsonl gets one line per run,
appended in one write and fsync'd; running the sweep again skips every run it holds. results.md,
results.csv and the PNG plots are rebuilt from it after every run.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as a file: make `scripts` and `accum` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from accum.cli.config import ConfigError, OneLineParser, load_yaml, make_config
from accum.cli.launch import SEE_ABOVE, check_accelerate_config
from accum.cli.planning import resolve_batch_and_lr, resolve_batch_flags
from accum.cli.status import STATUS_FILE, ExitStatus, read_status
from accum.files import write_bytes_atomic

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
RESULTS = "results.jsonl"
TABLE_COLUMNS = ("run", "k", "target", "micro", "accum", "effective", "lr", "final loss", "eval metric",
                 "samples/s", "peak memory", "wall s", "status", "B_simple")


# ----------------------------------------------------------------------------- the sweep config


class BaseRun(BaseModel):
    """The run every sweep point starts from: a run config file plus overrides."""

    model_config = ConfigDict(extra="forbid")
    config: str | None = Field(None, description="run config YAML (configs/...)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="RunConfig keys set for every run")


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["random"] = "random"
    trials: int = Field(..., gt=0)
    seed: int = 0


class SweepConfig(BaseModel):
    """A whole sweep. Sizes are in samples; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="default: the sweep file's name")
    kind: Literal["scaling", "split", "grid"]
    base: BaseRun = Field(default_factory=BaseRun)
    accelerate_config: str = "accelerate_configs/cpu.yaml"
    output_dir: str | None = Field(None, description="default: runs/sweep/<name>")
    budget_samples: int | None = Field(None, gt=0, description="samples per run: max_steps = budget / effective batch")
    timeout_s: float | None = Field(None, gt=0, description="wall-clock limit per run")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables for every run")
    variants: dict[str, dict[str, Any]] | None = Field(None, description="named overrides crossed with every run")
    # scaling
    k: list[int] | None = None
    base_batch_size: int | None = Field(None, gt=0)
    rules: list[Literal["none", "linear", "sqrt"]] | None = None
    micro_batch_size: int | Literal["auto"] | None = None
    # split
    batch_size: int | None = Field(None, gt=0)
    micro_batch_sizes: list[int] | None = None
    # grid
    axes: dict[str, list[Any]] | None = None
    search: Search | None = None

    @model_validator(mode="after")
    def _kind_has_its_axes(self) -> SweepConfig:
        needs = {"scaling": ("k", "base_batch_size"), "split": ("batch_size", "micro_batch_sizes"), "grid": ("axes",)}
        for key in needs[self.kind]:
            if getattr(self, key) in (None, [], {}):
                raise ValueError(f"a {self.kind} sweep needs `{key}`")
        foreign = {"scaling": ("batch_size", "micro_batch_sizes", "axes", "search"),
                   "split": ("k", "base_batch_size", "rules", "axes", "search"),
                   "grid": ("k", "base_batch_size", "rules", "batch_size", "micro_batch_sizes")}
        for key in foreign[self.kind]:
            if getattr(self, key) is not None:
                raise ValueError(f"`{key}` is not a key of a {self.kind} sweep; remove it or change `kind`")
        for key in ("k", "micro_batch_sizes"):
            if any(value <= 0 for value in getattr(self, key) or []):
                raise ValueError(f"`{key}` must hold positive integers")
        return self


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML. Raises ConfigError with one line."""
    values = load_yaml(path)
    try:
        sweep = SweepConfig(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: unknown sweep key {key!r}; see scripts/sweep.py's docstring") from None
        got = f" (got {error.get('input')!r:.80})" if key else ""
        raise ConfigError(f"{path}: {key + ': ' if key else ''}{error['msg'].replace('Value error, ', '')}{got}") from None
    if sweep.name is None:
        sweep.name = Path(path).stem
    if sweep.output_dir is None:
        sweep.output_dir = f"runs/sweep/{sweep.name}"
    for named in filter(None, (sweep.base.config, sweep.accelerate_config)):
        if not Path(named).is_file():
            raise ConfigError(f"{path}: {named!r} does not exist (paths are relative to where the sweep runs)")
    check_accelerate_config(sweep.accelerate_config)  # before any run is planned or launched
    return sweep


def num_processes_of(accelerate_config: str) -> int:
    data = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    return int(data.get("num_processes") or 1)


# ----------------------------------------------------------------------------- planning the runs


@dataclass
class RunSpec:
    """One point of the sweep: its name, its axis values, and the full run config (or why not)."""

    name: str
    axes: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)
    k: int | None = None
    rule: str | None = None
    target: int | None = None
    micro: int | str | None = None
    accum: int | str | None = None
    effective: int | None = None
    lr: float | None = None
    max_steps: int | None = None
    error: str | None = None  # set when the point is invalid: it is recorded, never launched
    note: str | None = None

    def spec_hash(self) -> str:
        """Identifies what the run would train, so a changed sweep is not mistaken for a finished one.
        Only values that differ from RunConfig's defaults count: a new config key does not change it."""
        try:
            values = make_config(self.values).model_dump(mode="json", exclude_defaults=True)
        except ConfigError:
            values = self.values
        text = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def slug(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:40] or "x"


class NoSplit(ConfigError):
    """A point whose effective batch is not micro x accumulation x processes for a whole accumulation."""


def exact_accum(batch: int, micro: int, processes: int) -> int | NoSplit:
    """batch / (micro x processes) when it divides exactly; else the one-line error the point is recorded with."""
    if batch % (micro * processes) == 0:
        return batch // (micro * processes)
    return NoSplit(f"effective batch {batch} is not a multiple of micro-batch {micro} x {processes} "
                   f"process{'es' if processes > 1 else ''}: choose a micro-batch that divides it")


def kind_points(sweep: SweepConfig, processes: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, axis values for the table, RunConfig overrides) for each point of the sweep's kind."""
    points = []
    if sweep.kind == "scaling":
        rules = sweep.rules or ["none"]
        for k, rule in itertools.product(sweep.k, rules):
            target = k * sweep.base_batch_size
            overrides = {"batch_size": target, "lr_scaling": rule, "base_batch_size": sweep.base_batch_size}
            if sweep.micro_batch_size is not None:
                micro = sweep.micro_batch_size
                overrides["micro_batch_size"] = micro
                overrides["grad_accum_steps"] = "auto" if micro == "auto" else exact_accum(target, micro, processes)
            name = f"k{k}" + (f"-{rule}" if len(rules) > 1 or rule != "none" else "")
            points.append((name, {"k": k, "rule": rule}, overrides))
    elif sweep.kind == "split":
        for micro in sweep.micro_batch_sizes:
            accum = exact_accum(sweep.batch_size, micro, processes)
            overrides = {"batch_size": sweep.batch_size, "micro_batch_size": micro, "grad_accum_steps": accum}
            points.append((f"b{sweep.batch_size}-m{micro}", {"micro": micro}, overrides))
    else:
        keys = list(sweep.axes)
        combos = list(itertools.product(*(sweep.axes[key] for key in keys)))
        if sweep.search is not None and sweep.search.trials < len(combos):
            chosen = sorted(random.Random(sweep.search.seed).sample(range(len(combos)), sweep.search.trials))
            combos = [combos[i] for i in chosen]
        for combo in combos:
            overrides = dict(zip(keys, combo, strict=True))
            name = ",".join(f"{key}={slug(value)}" for key, value in overrides.items())
            points.append((name, dict(overrides), overrides))
    return points


def plan_runs(sweep: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, in order, with its full config and derived batch/LR; invalid points
    carry their one-line error instead (they are recorded as failed, never launched)."""
    processes = num_processes_of(sweep.accelerate_config)
    name_max = longest_name(Path(sweep.output_dir))
    base_values = load_yaml(sweep.base.config) if sweep.base.config else {}
    base_values.update(sweep.base.overrides)
    variants = sweep.variants or {"": {}}
    specs = []
    for (name, axes, overrides), (variant, extra) in itertools.product(kind_points(sweep, processes), variants.items()):
        full_name = f"{name}-{slug(variant)}" if variant else name
        spec = RunSpec(full_name, dict(axes, **({"variant": variant} if variant else {})),
                       k=axes.get("k"), rule=axes.get("rule"))
        values = dict(base_values, **overrides, **extra)
        values.update(output_dir=str(Path(sweep.output_dir) / full_name), overwrite=True)
        derive_batch_and_lr(spec, values, sweep.budget_samples, processes)
        if len(full_name.encode()) > name_max:  # its directory could not be made: recorded, never launched
            spec.error = (f"run name is {len(full_name.encode())} bytes, longer than the {name_max} the file system "
                          "allows for a directory name: shorten the axis values or the variant names")
        specs.append(spec)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two runs share a name ({sorted(n for n in names if names.count(n) > 1)[0]!r}): "
                          "give the variants or axis values distinct names")
    return specs


def longest_name(directory: Path) -> int:
    """The longest file name the file system under `directory` (or its nearest existing parent) allows."""
    existing = next((p for p in (directory, *directory.absolute().parents) if p.exists()), Path("/"))
    try:
        return os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255  # POSIX file systems' usual limit (NAME_MAX), when the system does not say


def check_output_dir(out: Path) -> None:
    """The sweep's output_dir, or the nearest part of it that exists, must be a directory. Raises ConfigError."""
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"output_dir {str(out)!r}: {existing} is not a directory: choose another output_dir")


def derive_batch_and_lr(spec: RunSpec, values: dict[str, Any], budget_samples: int | None, processes: int) -> None:
    """Validate the run's config and fill in target, micro, accum, effective, lr and max_steps."""
    try:
        if isinstance(values.get("grad_accum_steps"), NoSplit):
            raise values.pop("grad_accum_steps")
        config = make_config(values)
        target, micro, accum, note = resolve_batch_flags(config, set(), processes)
        spec.target, spec.note = target, note
        spec.micro, spec.accum = micro or "auto", accum or "auto"
        if micro is not None and accum is not None:
            spec.effective = micro * accum * processes
        elif target % processes == 0:
            spec.effective = target  # the planner splits it exactly (or train.py says why not)
        if budget_samples is not None:
            if spec.effective is None:
                raise ConfigError(f"batch size {target} over {processes} processes has no exact split for a budget")
            steps = max(1, budget_samples // spec.effective)
            if steps * spec.effective != budget_samples:
                spec.note = (f"budget {budget_samples} samples is not a multiple of the effective batch "
                             f"{spec.effective}: {steps} steps = {steps * spec.effective} samples")
            config = make_config(dict(values, max_steps=steps))
        spec.max_steps = config.max_steps
        spec.lr = resolve_batch_and_lr(config, processes)[1]  # train.py's own rule (a schedule's first batch)
        spec.values = config.model_dump(mode="json")
    except (ConfigError, ValueError) as exc:
        spec.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        spec.values = json.loads(json.dumps(values, default=str))


# ----------------------------------------------------------------------------- results.jsonl


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of results.jsonl in file order; a line that does not parse is reported and skipped."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}:{number} is not a JSON line; ignored", file=sys.stderr)
    return records


def append_result(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single write(2) on an O_APPEND descriptor, then fsync: a reader
    or a crash never sees half a line, and two lines never interleave."""
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_by_run(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["run"]] = record
    return latest


@contextlib.contextmanager
def sweep_lock(out: Path):
    """One sweep at a time per output dir: a second one would run and record the same runs twice."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".sweep.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another sweep is running in {out}: wait for it, or use another output_dir") from None
        yield


# ----------------------------------------------------------------------------- running one run


def launch_command(accelerate_config: str, run_config: Path) -> list[str]:
    """`python -m accum launch`: accelerate launch that hands back train.py's own exit code (4 for an
    out-of-memory exit, 2 for bad input) with no launcher traceback after train.py's error line."""
    command = [sys.executable, "-m", "accum", "launch", "--config_file", accelerate_config]
    return command + [str(TRAIN_SCRIPT), "--config", str(run_config)]


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, **{key: str(value) for key, value in (extra or {}).items()})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(TRAIN_SCRIPT.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def crash_line(stderr_lines: list[str]) -> str | None:
    """For a run that wrote no reason of its own (a crash, a kill): the last line it printed that is not
    a progress bar or the launcher's account of the failure."""
    noise = ("CalledProcessError", "subprocess.", "ChildFailedError", "torch.distributed.elastic", SEE_ABOVE)
    lines = [line.strip() for line in stderr_lines if line.strip() and "\r" not in line and "it/s]" not in line]
    lines = [line for line in lines if not any(word in line for word in noise)]
    return lines[-1].removeprefix("error: ")[:400] if lines else None


def outcome(returncode: int, status: dict[str, Any] | None, timed_out: bool) -> str:
    """ok | oom | timeout | failed, from the run's status.json (what train.py says of its own end) and
    its exit code when it wrote none (killed: SIGKILL with no word is usually the kernel's OOM killer)."""
    if timed_out:
        return "timeout"
    code = status["exit_code"] if status is not None else returncode
    if code == ExitStatus.OK:
        return "ok"
    if code == ExitStatus.OUT_OF_MEMORY or (status is None and code in (-signal.SIGKILL, 128 + signal.SIGKILL)):
        return "oom"
    return "failed"


def execute(spec: RunSpec, sweep: SweepConfig) -> dict[str, Any]:
    """Run one training process; return its result record (never raises for a failed run)."""
    out = Path(spec.values["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    run_config = out / "run_config.yaml"
    header = f"# python scripts/train.py --config {run_config}\n# generated by scripts/sweep.py: run {spec.name}\n"
    run_config.write_text(header + yaml.safe_dump(spec.values, sort_keys=False))
    (out / STATUS_FILE).unlink(missing_ok=True)  # an earlier attempt's: the sweep's own run dir
    command = launch_command(sweep.accelerate_config, run_config)
    stderr_tail: deque[str] = deque(maxlen=200)
    started = time.perf_counter()
    timed_out = False
    with open(out / "train.log", "ab", buffering=0) as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE, env=run_env(sweep.env),
                                start_new_session=True,  # its own group: a timeout kills the launcher's ranks too
                                preexec_fn=stop_when_parent_dies())

        def tee() -> None:
            for raw in proc.stderr:
                log.write(raw)
                stderr_tail.append(raw.decode(errors="replace"))

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=sweep.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        except BaseException:  # Ctrl-C: take the run down with us, record nothing
            kill_group(proc)
            raise
        reader.join(timeout=10)
    wall = time.perf_counter() - started
    run_status = read_status(out)
    error = None
    if proc.returncode != 0:
        error = (run_status or {}).get("reason") or crash_line(list(stderr_tail))
    if timed_out:
        error = f"killed after the run's time limit of {sweep.timeout_s:g} s (timeout_s)"
    status = outcome(proc.returncode, run_status, timed_out)
    if status == "ok" and not (out / "metrics.json").exists():
        status, error = "failed", "train.py exited 0 but wrote no metrics.json"
    record = base_record(spec, sweep)
    record.update(status=status, error=error, returncode=proc.returncode, wall_s=round(wall, 2),
                  log=str(out / "train.log"), command=" ".join(command))
    if status == "ok":
        record.update(read_run_metrics(out))
    return record


def stop_when_parent_dies():
    """For Popen's preexec_fn: SIGTERM to the run if the sweep dies, even by SIGKILL, so no orphaned
    run trains on while the restarted sweep starts it again (the run saves and exits on SIGTERM).
    Linux only (prctl PR_SET_PDEATHSIG); None elsewhere. libc is loaded here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def base_record(spec: RunSpec, sweep: SweepConfig) -> dict[str, Any]:
    return {"run": spec.name, "spec_hash": spec.spec_hash(), "sweep": sweep.name, "kind": sweep.kind,
            "axes": spec.axes, "k": spec.k, "rule": spec.rule, "target": spec.target, "micro": spec.micro,
            "accum": spec.accum, "effective": spec.effective, "lr": spec.lr, "max_steps": spec.max_steps,
            "output_dir": spec.values.get("output_dir"), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def read_run_metrics(out: Path) -> dict[str, Any]:
    """What the table needs from a finished run's metrics.json (and B_simple from metrics.jsonl)."""
    metrics = json.loads((out / "metrics.json").read_text())
    evals = metrics.get("eval") or {}
    metric_name = next((name for name in ("accuracy", "perplexity") if name in evals), "loss" if evals else None)
    record = {
        "micro": metrics.get("micro_batch_size"), "accum": metrics.get("gradient_accumulation_steps"),
        "effective": metrics.get("effective_batch_size"), "lr": metrics.get("lr"),
        "final_loss": metrics.get("final_loss"), "ema_loss": metrics.get("ema_loss"),
        "eval_loss": evals.get("loss"), "eval_metric_name": metric_name,
        "eval_metric": evals.get(metric_name) if metric_name else None,
        "samples_per_s": metrics.get("samples_per_s"), "tokens_per_s": metrics.get("tokens_per_s"),
        "peak_memory_bytes": metrics.get("peak_memory_bytes"), "train_seconds": metrics.get("train_seconds"),
        "optimizer_steps": metrics.get("optimizer_step"), "samples_seen": metrics.get("samples_seen"),
    }
    record.update(b_simple_in_samples(final_b_simple(out, metrics), out, metrics))
    return record


def b_simple_in_samples(items: float | None, out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """B_simple is in the loss's items; with token normalisation, divide by tokens per sample so it
    reads against the effective batch (an approximation: tokens of one sequence are correlated)."""
    if items is None:
        return {"b_simple": None, "b_simple_items": None, "b_simple_unit": None}
    unit = "samples"
    with contextlib.suppress(OSError, json.JSONDecodeError, ConfigError):
        unit = make_config(json.loads((out / "config.json").read_text())).resolved_loss_normalization()
    samples = items
    if unit == "tokens" and metrics.get("samples_seen") and metrics.get("tokens_seen"):
        samples = items / (metrics["tokens_seen"] / metrics["samples_seen"])
    return {"b_simple": samples, "b_simple_items": items, "b_simple_unit": unit}


def final_b_simple(out: Path, metrics: dict[str, Any]) -> float | None:
    """B_simple at the end of the run: metrics.json's if it reports one, else the last logged value."""
    for holder in (metrics, metrics.get("noise") or {}):
        for key in ("noise_b_simple", "b_simple"):
            if isinstance(holder.get(key), (int, float)):
                return float(holder[key])
    value = None
    steps = out / "metrics.jsonl"
    if steps.exists():
        for line in steps.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                found = json.loads(line).get("noise_b_simple")
                value = found if isinstance(found, (int, float)) else value
    return value


# ----------------------------------------------------------------------------- tables


def fmt_number(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _fmt_raw(value: Any, digits: int = 0) -> str:
    return "" if value is None else str(value)


def fmt_bytes(value: Any) -> str:
    return "" if value is None else f"{value / 2**20:.0f} MiB"


def table_rows(records: list[dict[str, Any]], csv_values: bool = False) -> list[list[str]]:
    """Rows of TABLE_COLUMNS: rounded for people, or (csv_values) full precision and raw bytes."""
    rows = []
    fmt_number = _fmt_raw if csv_values else globals()["fmt_number"]
    for r in records:
        metric = r.get("eval_metric")
        metric_text = fmt_number(metric) if csv_values else (
            f"{r['eval_metric_name']} {fmt_number(metric)}" if metric is not None else "")
        status = r["status"] if r["status"] == "ok" or csv_values else f"{r['status']}: {r.get('error') or ''}"
        rows.append([
            r["run"], fmt_number(r.get("k")), fmt_number(r.get("target")), fmt_number(r.get("micro")),
            fmt_number(r.get("accum")), fmt_number(r.get("effective")), fmt_number(r.get("lr"), 3),
            fmt_number(r.get("final_loss")), metric_text, fmt_number(r.get("samples_per_s"), 3),
            fmt_number(r.get("peak_memory_bytes")) if csv_values else fmt_bytes(r.get("peak_memory_bytes")),
            fmt_number(r.get("wall_s"), 3), status, fmt_number(r.get("b_simple"), 3),
        ])
    return rows


def markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    cells = [list(header)] + [[cell.replace("|", "\\|") for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_tables(out: Path, sweep: SweepConfig, records: list[dict[str, Any]]) -> str:
    """results.md and results.csv from the latest record of each run; returns the Markdown table."""
    table = markdown_table(TABLE_COLUMNS, table_rows(records))
    metric_names = sorted({r["eval_metric_name"] for r in records if r.get("eval_metric_name")})
    notes = [f"eval metric: {', '.join(metric_names) or 'none'} on the held-out split; peak memory: "
             "the process's peak (RSS high-water mark on CPU, allocated on CUDA); B_simple: the gradient noise "
             "scale at the end of the run (needs noise_scale and accumulation >= 2 or 2 processes), in the "
             "loss's items (samples, or tokens for token-normalised losses)"]
    text = (f"# Sweep {sweep.name} ({sweep.kind})\n\n`python scripts/sweep.py --config <this sweep>` "
            f"with {sweep.accelerate_config}; one line per run in {RESULTS}.\n\n{table}\n\n" + "\n".join(notes) + "\n")
    write_text_atomic(out / "results.md", text)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([c if c != "peak memory" else "peak memory bytes" for c in TABLE_COLUMNS]
                    + ["eval metric name", "error"])
    for record, row in zip(records, table_rows(records, csv_values=True), strict=True):
        writer.writerow(row + [record.get("eval_metric_name") or "", record.get("error") or ""])
    write_text_atomic(out / "results.csv", buffer.getvalue())
    return table


def dry_run_table(specs: list[RunSpec], done: dict[str, dict[str, Any]]) -> str:
    header = ("run", "k", "target", "micro", "accum", "effective", "lr", "max steps", "status")
    rows = []
    for spec in specs:
        status = f"invalid: {spec.error}" if spec.error else ("done" if spec.name in done else "to run")
        rows.append([spec.name, fmt_number(spec.k), fmt_number(spec.target), fmt_number(spec.micro),
                     fmt_number(spec.accum), fmt_number(spec.effective), fmt_number(spec.lr, 3),
                     fmt_number(spec.max_steps), status])
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------- plots


def load_curve(record: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(samples seen, loss) per optimizer step of a run, from its metrics.jsonl."""
    path = Path(record.get("output_dir") or "") / "metrics.jsonl"
    xs, ys = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                step = json.loads(line)
                x, y = float(step["samples_seen"]), float(step["loss"])
                if math.isfinite(y):
                    xs.append(x)
                    ys.append(y)
    return xs, ys


def smoothing_window(lengths: list[int]) -> int:
    """Optimizer steps the loss plot averages over: a quarter of the shortest run, between 2 and 25, so
    that the bold line is smoother than the faint one in every run and lags none by much."""
    return max(2, min(25, min(lengths, default=8) // 4))


def rolling_mean(ys: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for index, value in enumerate(ys):
        total += value
        if index >= window:
            total -= ys[index - window]
        out.append(total / min(index + 1, window))
    return out


def loss_figure(name: str, curves: list[tuple[str, list[float], list[float]]]):
    """Loss against samples seen, per run: faint per optimizer step, bold a rolling mean over optimizer
    steps. `curves`: (label, samples seen, loss). Returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    window = smoothing_window([len(xs) for _, xs, _ in curves if xs])
    for label, xs, ys in curves:
        if xs:
            line, = ax.plot(xs, ys, linewidth=0.8, alpha=0.35)
            ax.plot(xs, rolling_mean(ys, window), color=line.get_color(), linewidth=1.8, label=label)
    ax.set(xlabel="samples seen", ylabel="training loss")
    ax.set_title(f"{name}: loss vs samples seen\n(faint: each optimizer step; bold: mean of the last {window} "
                 "optimizer steps)", fontsize=9)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speed_memory_figure(name: str, ok: list[dict[str, Any]]):
    """Throughput and peak memory against the micro-batch (or, when every run has the same one, the
    accumulation steps). Returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    micros = {r.get("micro") for r in ok}
    x_key, x_label = ("micro", "micro-batch (samples)") if len(micros) > 1 else (
        "accum", f"accumulation steps (micro-batch fixed at {next(iter(micros))})")
    for axis, key, label, scale in ((left, "samples_per_s", "throughput (samples/s)", 1.0),
                                    (right, "peak_memory_bytes", "peak memory (MiB)", 2**-20)):
        for record in ok:
            if isinstance(record.get(key), (int, float)) and isinstance(record.get(x_key), int):
                x, y = record[x_key], record[key] * scale
                axis.scatter(x, y, s=30)
                axis.annotate(f"{record['micro']}x{record['accum']}", (x, y), fontsize=7,
                              textcoords="offset points", xytext=(4, 4))
        axis.set(xlabel=x_label, ylabel=label)
        plain_log2_axis(axis)
        axis.set_ylim(bottom=0, top=axis.get_ylim()[1] * 1.1)
        axis.grid(alpha=0.3)
    fig.suptitle(f"{name}: speed and memory (labels: micro x accumulation)")
    fig.tight_layout()
    return fig


def quality_figure(name: str, ok: list[dict[str, Any]], budget_samples: int | None = None):
    """Final eval loss (and the eval metric) of each run. Against the effective batch (log scale, one line
    per group of runs) when the runs differ in it; when they all share one (a split sweep), one bar per
    run, labelled with its value, from zero: the runs train the same model, so the bars should match.
    Returns the Figure."""
    from matplotlib.figure import Figure

    metric_names = sorted({r["eval_metric_name"] for r in ok if r.get("eval_metric_name") not in (None, "loss")})
    panels = [("eval_loss", "eval loss (held out)")] + [("eval_metric", f"eval {n}") for n in metric_names[:1]]
    fig = Figure(figsize=(6 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    batches = {r.get("effective") for r in ok}
    b_simple = sorted(r["b_simple"] for r in ok if isinstance(r.get("b_simple"), (int, float)))
    for ax, (key, label) in zip(axes, panels, strict=True):
        scored = [r for r in ok if isinstance(r.get(key), (int, float))]
        if len(batches) == 1:
            names = [f"{r['run']}\n{r.get('micro')}x{r.get('accum')}" for r in scored]
            bars = ax.bar(range(len(scored)), [r[key] for r in scored], color="tab:blue", alpha=0.8)
            ax.bar_label(bars, labels=[fmt_number(r[key]) for r in scored], fontsize=8)
            ax.set_xticks(range(len(scored)), names, fontsize=8)
            ax.set(xlabel=f"run (micro x accumulation), all at effective batch {next(iter(batches))}", ylabel=label)
            ax.set_ylim(0, max((r[key] for r in scored), default=1) * 1.15)
        else:
            groups: dict[str, list[dict[str, Any]]] = {}
            for record in scored:
                groups.setdefault(group_label(record), []).append(record)
            for group, members in groups.items():
                members = sorted(members, key=lambda r: r["effective"])
                ax.plot([r["effective"] for r in members], [r[key] for r in members], marker="o", label=group or None)
            if b_simple:
                median = b_simple[len(b_simple) // 2]
                ax.axvline(median, color="grey", linestyle="--", linewidth=1,
                           label=f"B_simple ~ {median:.3g} samples (median over runs)")
            plain_log2_axis(ax)
            ax.set(xlabel="effective batch (samples)", ylabel=label)
            if any(groups) or b_simple:
                ax.legend(fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3, axis="y")
    budget = f", {budget_samples} samples per run" if budget_samples else ""
    fig.suptitle(f"{name}: final quality vs effective batch{budget}")
    fig.tight_layout()
    return fig


def plain_log2_axis(ax) -> None:
    """A log2 x axis whose ticks read 4, 8, 16 (not 2^2, 2^3, 2^4)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def write_plots(out: Path, sweep: SweepConfig, records: list[dict[str, Any]]) -> list[Path]:
    """The sweep's plots as PNG files in `out` (none before a run has finished); returns their paths."""
    return [save_figure(fig, out / name) for name, fig in build_figures(sweep, records).items()]


def build_figures(sweep: SweepConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """File name -> matplotlib Figure: loss vs samples seen per run; throughput and peak memory vs
    micro-batch; quality vs effective batch. Empty when no run finished. The caller saves or closes them."""
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return {}
    curves = [(f"{r['run']} (batch {r.get('effective')})", *load_curve(r)) for r in ok]
    return {"loss_vs_samples.png": loss_figure(sweep.name, curves),
            "throughput_memory_vs_micro.png": speed_memory_figure(sweep.name, ok),
            "quality_vs_effective_batch.png": quality_figure(sweep.name, ok, sweep.budget_samples)}


def group_label(record: dict[str, Any]) -> str:
    """Runs on one line of the quality plot: same axes apart from the batch ones."""
    axes = {k: v for k, v in (record.get("axes") or {}).items() if k not in ("k", "micro", "batch_size")}
    if "rule" in axes:
        axes["rule"] = f"LR {axes['rule']}"
    return ", ".join(str(v) if k in ("rule", "variant") else f"{k}={v}" for k, v in axes.items())


def save_figure(fig, path: Path) -> Path:
    """The Figure as a PNG, written atomically. Figures are built without pyplot (no global state to close)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())
    return path


# ----------------------------------------------------------------------------- the sweep


def finished_line(record: dict[str, Any]) -> str:
    """One greppable line per finished run."""
    parts = [f"run {record['run']}", f"status {record['status']}"]
    if record["status"] != "invalid":
        parts += [f"effective {fmt_number(record.get('effective'))}", f"lr {fmt_number(record.get('lr'), 3)}"]
    if record["status"] == "ok":
        parts += [f"final_loss {fmt_number(record.get('final_loss'))}",
                  f"eval_{record.get('eval_metric_name')} {fmt_number(record.get('eval_metric'))}",
                  f"samples/s {fmt_number(record.get('samples_per_s'), 3)}",
                  f"B_simple {fmt_number(record.get('b_simple'), 3) or '-'}"]
    if record["status"] != "invalid":
        parts.append(f"wall {fmt_number(record.get('wall_s'), 3)}s")
    if record.get("error"):
        parts.append(f"error: {record['error']}")
    return " ".join(parts)


def check_unchanged(specs: list[RunSpec], done: dict[str, dict[str, Any]], results: Path) -> None:
    for spec in specs:
        old = done.get(spec.name)
        if old is not None and old.get("spec_hash") != spec.spec_hash():
            raise ConfigError(f"run {spec.name!r} in {results} was made with other settings than the sweep now "
                              "asks for: use another output_dir, or delete the old results to start over")


def run_sweep(sweep: SweepConfig, retry_failed: bool = False) -> list[dict[str, Any]]:
    """Run every planned run not yet in results.jsonl; return the latest record of each run, in plan order."""
    from tqdm.auto import tqdm

    specs = plan_runs(sweep)
    out = Path(sweep.output_dir)
    results = out / RESULTS
    check_output_dir(out)
    with sweep_lock(out):
        done = latest_by_run(read_results(results))
        check_unchanged(specs, done, results)
        todo = [s for s in specs if s.name not in done or (retry_failed and done[s.name]["status"] != "ok")]
        print(f"sweep {sweep.name} ({sweep.kind}): {len(specs)} runs, {len(specs) - len(todo)} already recorded "
              f"in {results}, {len(todo)} to run with {sweep.accelerate_config}")
        for spec in specs:
            if spec.note:
                print(f"note: run {spec.name}: {spec.note}")
        progress = tqdm(todo, desc="runs", unit="run", dynamic_ncols=True)
        for spec in progress:
            progress.set_postfix_str(spec.name)
            if spec.error:
                record = base_record(spec, sweep)
                record.update(status="invalid", error=spec.error, wall_s=0.0)
            else:
                record = execute(spec, sweep)
            if spec.name in done:
                record["attempt"] = int(done[spec.name].get("attempt", 1)) + 1
            append_result(results, record)
            done[spec.name] = record
            progress.write(finished_line(record))
            ordered = [done[s.name] for s in specs if s.name in done]
            write_tables(out, sweep, ordered)
            write_plots(out, sweep, ordered)
        progress.close()
    ordered = [done[s.name] for s in specs if s.name in done]
    if not todo and ordered:  # nothing ran: rebuild tables and plots anyway (e.g. after editing this script)
        write_tables(out, sweep, ordered)
        write_plots(out, sweep, ordered)
    return ordered


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: every failure is one line on stderr and a documented exit code (2 bad input,
    5 a write failed, 130 interrupted, 1 a bug), never a traceback unless --debug asks for it."""
    parser = OneLineParser(prog="scripts/sweep.py", description="Sweep accumulation settings, one training process "
                                                                "per run.",
                           epilog="Every flag also works with underscores (--output_dir).")
    parser.add_argument("--config", required=True, metavar="FILE", help="sweep YAML (configs/sweep*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    parser.add_argument("--output-dir", metavar="PATH", help="override the sweep's output_dir")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run again the runs recorded as failed/oom/timeout (a new line, attempt 2, ...)")
    parser.add_argument("--debug", action="store_true", help="on a failure, print the traceback before its line")
    debug, results = "--debug" in (sys.argv[1:] if argv is None else argv), RESULTS
    try:
        args = parser.parse_args(argv)
        sweep = load_sweep(args.config)
        if args.output_dir:
            sweep.output_dir = args.output_dir
        results = Path(sweep.output_dir) / RESULTS
        if args.dry_run:
            check_output_dir(Path(sweep.output_dir))
            specs = plan_runs(sweep)
            done = latest_by_run(read_results(Path(sweep.output_dir) / RESULTS))
            print(f"sweep {sweep.name} ({sweep.kind}), {len(specs)} runs with {sweep.accelerate_config} "
                  f"into {sweep.output_dir}:")
            print(dry_run_table(specs, done))
            for spec in specs:
                if spec.note:
                    print(f"note: run {spec.name}: {spec.note}")
            return 0
        started = time.perf_counter()
        records = run_sweep(sweep, retry_failed=args.retry_failed)
        out = Path(sweep.output_dir)
        print(write_tables(out, sweep, records) if records else "no runs")
    except KeyboardInterrupt:
        print(f"\ninterrupted: the run in progress was stopped and not recorded; the same command resumes "
              f"from {results}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure is one line and an exit code (accum.cli.status)
        from accum.cli.status import report_failure

        return report_failure(exc, debug, io_fix="free space or choose another output_dir, then run the same "
                                                 "command: finished runs are kept in results.jsonl")
    failed = sum(r["status"] != "ok" for r in records)
    print(f"sweep {sweep.name}: {len(records) - failed} ok, {failed} not ok, {time.perf_counter() - started:.0f} s; "
          f"tables {out / 'results.md'}, {out / 'results.csv'}; plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
