"""`python -m accum launch`: `accelerate launch`, with bad input refused in one line.

    python -m accum launch --config_file accelerate_configs/cpu.yaml scripts/train.py --config configs/default.yaml

Every argument is `accelerate launch`'s, parsed by accelerate's own parser. Three things differ:

- The accelerate config is checked first (`check_accelerate_config`): a missing file, bad YAML, an
  unknown key, a value of the wrong type or outside its choices is one line naming the key and the
  fix, exit code 2, and nothing is launched. `accelerate launch` itself reports these with a
  traceback, or not at all until a rank trips over the value.
- The script's own exit code comes back (2 bad input, 3 non-finite loss, 4 out of memory, 5 I/O,
  130/143 interrupted, ...) with no launcher traceback after the script's one-line error:
  `accelerate launch` turns every failure into 1 and appends CalledProcessError or torch elastic's
  ChildFailedError report. An exit the script did not explain with an `error:` line of its own (a
  kill, a crash of a script without one) gets one line.
  Every rank prints the same `error: ` line; it is shown once. Ctrl-C or SIGTERM to this process
  reaches the script, which finishes its step and saves.
- `use_cpu: true` in the config reaches the ranks (ACCELERATE_USE_CPU=1): on its own, accelerate
  launches a multi-CPU config whose ranks then each train alone (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accum.cli.status import ExitStatus
from accum.errors import ConfigError

# Keys accelerate itself rewrites into the current format before checking (config_args.process_config).
_LEGACY_KEYS = {"fp16", "dynamo_backend"}
_CHOICES_FIX = "run `accelerate config` to write a valid file, or see accelerate_configs/ for examples"


# ----------------------------------------------------------------------------- the accelerate config


def check_accelerate_config(path: str | Path | None) -> dict[str, Any]:
    """Validate an accelerate config file the way `accelerate launch` will read it; return its keys.

    None means accelerate's default file (~/.cache/huggingface/accelerate/default_config.yaml),
    which may not exist: then accelerate uses its defaults and there is nothing to check.
    Raises ConfigError with one line naming the key, the value and the fix.
    """
    from accelerate.commands.config.config_args import default_config_file

    if path is None:
        if not os.path.isfile(default_config_file):
            return {}
        path = default_config_file
    name = str(path)
    if not os.path.isfile(name):
        raise ConfigError(f"accelerate config {name!r} does not exist: check --config_file "
                          "(accelerate_configs/ has one per setup)")
    data = _read_mapping(name)
    fields = _config_fields(data)
    unknown = sorted(set(map(str, data)) - set(fields) - _LEGACY_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "remove it, or upgrade accelerate if it is a newer key"
        raise ConfigError(f"accelerate config {name!r}: unknown key {unknown[0]!r}; {hint}")
    for key, value in data.items():
        _check_value(name, str(key), value, fields.get(str(key)))
    _check_choices(name, data)
    _check_counts(name, data)
    _check_with_accelerate(name)
    return data


def _read_mapping(name: str) -> dict[str, Any]:
    from accum.cli.config import MAX_CONFIG_BYTES, parse_yaml
    from accum.files import FileTooLarge, read_bounded

    kind = "JSON" if name.endswith(".json") else "YAML"
    try:
        text = read_bounded(name, MAX_CONFIG_BYTES).decode("utf-8")
        data = json.loads(text) if kind == "JSON" else parse_yaml(text)
    except FileTooLarge:
        raise ConfigError(f"accelerate config {name!r} is larger than {MAX_CONFIG_BYTES // 1024} KiB: check "
                          "--config_file") from None
    except OSError as exc:
        raise ConfigError(f"accelerate config {name!r} cannot be read ({exc.strerror or exc})") from None
    except (ConfigError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"accelerate config {name!r} is not valid {kind}: {first}; {_CHOICES_FIX}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"accelerate config {name!r} must be a mapping of keys to values (it holds "
                          f"{type(data).__name__ if data is not None else 'nothing'}); {_CHOICES_FIX}")
    return data


def _config_fields(data: dict[str, Any]) -> dict[str, Any]:
    """accelerate's own dataclass fields and their types, for the kind of config this is."""
    from accelerate.commands.config.config_args import ClusterConfig, SageMakerConfig
    from accelerate.utils import ComputeEnvironment

    sagemaker = data.get("compute_environment") == ComputeEnvironment.AMAZON_SAGEMAKER.value
    cls = SageMakerConfig if sagemaker else ClusterConfig
    hints = typing.get_type_hints(cls)
    return {name: hints.get(name, Any) for name in cls.__dataclass_fields__}


def _check_value(name: str, key: str, value: Any, annotation: Any) -> None:
    """One value against its field's type: int, bool, str, dict, list; None where Optional."""
    if annotation is None or annotation is Any:
        return
    args = typing.get_args(annotation)
    optional = type(None) in args
    if value is None:
        if optional:
            return
        raise ConfigError(f"accelerate config {name!r}: {key} is empty; give it a value or remove the line")
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    base = typing.get_origin(base) or base
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"accelerate config {name!r}: {key} must be a whole number (got {value!r})")
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"accelerate config {name!r}: {key} must be true or false (got {value!r})")
    if base is dict and not isinstance(value, dict):
        raise ConfigError(f"accelerate config {name!r}: {key} must be a mapping of keys to values (got {value!r:.80})")
    if base is list and not isinstance(value, list):
        raise ConfigError(f"accelerate config {name!r}: {key} must be a list (got {value!r:.80})")


def _check_choices(name: str, data: dict[str, Any]) -> None:
    from accelerate.utils import ComputeEnvironment, DistributedType, PrecisionType, SageMakerDistributedType

    sagemaker = data.get("compute_environment") == ComputeEnvironment.AMAZON_SAGEMAKER.value
    choices = {
        "compute_environment": [e.value for e in ComputeEnvironment],
        "distributed_type": [e.value for e in (SageMakerDistributedType if sagemaker else DistributedType)],
        "mixed_precision": [e.value for e in PrecisionType],
    }
    if "distributed_type" not in data:
        raise ConfigError(f"accelerate config {name!r}: distributed_type is missing; add e.g. "
                          "`distributed_type: 'NO'` (one process) or MULTI_GPU / MULTI_CPU")
    for key, allowed in choices.items():
        value = data.get(key)
        if value is None and key != "distributed_type":
            continue
        if isinstance(value, str) and key == "mixed_precision":
            value = value.lower()  # accelerate lowers it too
        if isinstance(value, bool):  # YAML 1.1 reads a bare NO as false
            raise ConfigError(f"accelerate config {name!r}: {key} reads as {value!r}: quote it, e.g. "
                              f"{key}: '{'NO' if value is False else 'YES'}'")
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(map(str, allowed))}"
            raise ConfigError(f"accelerate config {name!r}: {key} {value!r} is not a choice; {hint}")


def _check_counts(name: str, data: dict[str, Any]) -> None:
    processes, machines, rank = data.get("num_processes"), data.get("num_machines", 1), data.get("machine_rank", 0)
    if processes is not None and processes != -1 and processes < 1:
        raise ConfigError(f"accelerate config {name!r}: num_processes must be at least 1 (got {processes})")
    if machines is not None and machines < 1:
        raise ConfigError(f"accelerate config {name!r}: num_machines must be at least 1 (got {machines})")
    if rank is not None and machines is not None and not 0 <= rank < machines:
        raise ConfigError(f"accelerate config {name!r}: machine_rank {rank} must be in 0..{machines - 1} "
                          f"(num_machines {machines})")
    port = data.get("main_process_port")
    if port is not None and not 0 <= port < 65536:  # 0: pick a free port
        raise ConfigError(f"accelerate config {name!r}: main_process_port {port} is not a TCP port (0..65535)")


def _check_with_accelerate(name: str) -> None:
    """Last, accelerate's own reader: whatever it still refuses, in one line."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(name)
    except Exception as exc:  # noqa: BLE001 - any refusal of accelerate's reader is bad input here
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"accelerate config {name!r} is refused by accelerate: {first[:300]}") from None


# ----------------------------------------------------------------------------- the script's exit code

# scripts/train.py's exits that it explains in its own one line (bad input, non-finite loss, out of
# memory, I/O, lost rank, interrupted): nothing is added to them.
EXPLAINED_EXIT_CODES = ExitStatus.explained()
# Ends the line for an exit the script did not explain: its own traceback above is the message
# (scripts/sweep.py records that one instead).
SEE_ABOVE = "its own output above says why"
# torch elastic's account of a failed worker ("Sending process ... closing signal SIGTERM",
# "failed (exitcode: 2)"), logged after the script's own error line; the exit code says the same.
_ELASTIC_FAILURE_LOGGERS = ("torch.distributed.elastic.multiprocessing.api",
                            "torch.distributed.elastic.agent.server.api")


def script_exit(failure: BaseException) -> tuple[int, int | None]:
    """(exit code, global rank or None) of the script, from what the launcher raised: CalledProcessError
    (one process), torch elastic's ChildFailedError (its root-cause failure) or SignalException."""
    if isinstance(failure, subprocess.CalledProcessError):
        return failure.returncode, None
    if getattr(failure, "failures", None):
        rank, process_failure = failure.get_first_failure()
        return process_failure.exitcode, rank
    sigval = getattr(failure, "sigval", None)  # the launcher itself was signalled; its workers were stopped
    if sigval is not None:
        return -int(sigval), None
    if isinstance(failure, KeyboardInterrupt):
        return -signal.SIGINT, None
    return 1, None


def shell_code(code: int) -> int:
    """A child's exit status as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - code if code < 0 else code


def describe_exit(code: int, rank: int | None) -> str | None:
    """One line for an exit the script did not explain itself; None when it did (or succeeded)."""
    if code == 0 or shell_code(code) in EXPLAINED_EXIT_CODES:
        return None
    who = "the training script" if rank is None else f"rank {rank}"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ("; with no other message that is usually the kernel's out-of-memory killer: lower --max-memory "
                "or --micro-batch-size" if -code == signal.SIGKILL else "")
        return f"error: {who} was killed by {name}{hint}"
    return f"error: {who} exited with code {code}; {SEE_ABOVE}"


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def quiet_elastic_failure_logs():
    loggers, drop = [logging.getLogger(name) for name in _ELASTIC_FAILURE_LOGGERS], _Drop()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


@contextlib.contextmanager
def signals_passed_to_children():
    """While the launcher waits, SIGINT and SIGTERM to this process go to its children (the script)
    instead of killing this process and orphaning them. A script that gets one signal twice (Ctrl-C
    reaches the whole process group, and is passed on) counts it once: accum.signals. torch elastic
    installs its own handlers for its run, which pass the signal on too."""
    import psutil

    def forward(signum: int, _frame: Any) -> None:
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_children() -> None:
    """A launcher may return while a script it started still saves its checkpoint: wait for it."""
    import psutil

    psutil.wait_procs(psutil.Process().children(recursive=True))


class RepeatedErrorFilter:
    """Passes a byte stream on as it comes (progress bars included) but for an `error: ...` line
    already passed: every rank of a run prints the same one, and it is shown once. The error may
    follow a progress bar on the same line (tqdm leaves the cursor after the bar)."""

    MARK = b"error: "

    def __init__(self, write: Callable[[bytes], Any]):
        self._write = write
        self._partial = b""  # the current line so far
        self._sent = 0  # bytes of it already passed on
        self._errors_seen: set[bytes] = set()

    def feed(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).splitlines(keepends=True)
        self._partial = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        sent = self._sent  # what was passed on of the old partial line: the head of lines[0]
        for line in lines:
            self._line(line, sent)
            sent = 0
        self._sent = sent
        safe = self._safe_end(self._partial)
        if safe > self._sent:  # pass on what cannot be part of an error line yet
            self._write(self._partial[self._sent:safe])
            self._sent = safe

    @property
    def error_shown(self) -> bool:
        """Whether an `error: ` line has passed (the script explained its exit itself)."""
        return bool(self._errors_seen)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial, self._sent)
        self._partial, self._sent = b"", 0

    @classmethod
    def _safe_end(cls, partial: bytes) -> int:
        """How much of an unfinished line can go out now: up to an `error: ` in it, or to a tail
        that may be the start of one."""
        found = partial.find(cls.MARK)
        if found >= 0:
            return found
        for size in range(min(len(cls.MARK), len(partial)), 0, -1):
            if partial.endswith(cls.MARK[:size]):
                return len(partial) - size
        return len(partial)

    def _line(self, line: bytes, already_sent: int) -> None:
        found = line.find(self.MARK, already_sent)
        if found < 0:
            self._write(line[already_sent:])
            return
        self._write(line[already_sent:found])
        error = line[found:]
        if error.strip() in self._errors_seen:
            return
        self._errors_seen.add(error.strip())
        self._write(error)


@contextlib.contextmanager
def stderr_without_repeated_errors():
    """File descriptor 2 of this process, and so of every rank it starts, goes through a
    RepeatedErrorFilter on its way to the real stderr until the block ends (after the ranks exit)."""
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.fdopen(os.dup(real), "wb", buffering=0)
    errors = RepeatedErrorFilter(out.write)

    def pump() -> None:
        while chunk := os.read(read_end, 65536):
            errors.feed(chunk)
        errors.close()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield errors
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer here: EOF once the ranks have exited too
        reader.join(timeout=10)
        for fd in (real, read_end):
            os.close(fd)
        out.close()


def run_launcher(args: Any) -> int:
    """accelerate's own launch_command, in this process. Returns the script's exit code as a shell
    would, printing one line only where the script did not explain its exit itself."""
    from accelerate.commands.launch import launch_command

    failure: BaseException | None = None
    with stderr_without_repeated_errors() as errors, signals_passed_to_children(), quiet_elastic_failure_logs():
        try:
            launch_command(args)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the launcher's traceback is what we replace
            failure = exc
        except SystemExit as exc:  # accelerate --quiet exits 1 for any failure, the script's code lost
            failure = subprocess.CalledProcessError(int(exc.code), "accelerate launch") if exc.code else None
        finally:
            wait_for_children()
    if failure is None:
        return 0
    code, rank = script_exit(failure)
    line = describe_exit(code, rank) if not errors.error_shown else None  # its own line said why (a crash too)
    if line:
        print(line, file=sys.stderr, flush=True)
    return shell_code(code)


# ----------------------------------------------------------------------------- the command


def cpu_thread_args(args: Any, data: dict[str, Any]) -> list[str]:
    """On CPU, accelerate gives each process physical cores / processes threads and prints three lines
    saying so on every launch; pass the same number ourselves, so a one-line error stays one line."""
    if args.num_cpu_threads_per_process is not None or os.environ.get("OMP_NUM_THREADS"):
        return []
    if not (args.cpu or data.get("use_cpu") is True or os.environ.get("ACCELERATE_USE_CPU")):
        return []
    import psutil

    processes = args.num_processes or data.get("num_processes") or 1
    machines = args.num_machines or data.get("num_machines") or 1
    cores = psutil.cpu_count(logical=False) or 1
    return ["--num_cpu_threads_per_process", str(max(cores // max(processes // machines, 1), 1))]


def one_line_errors(parser):
    """accelerate's parser, but a usage error is one line (ConfigError, exit 2) rather than usage text."""
    def error(message: str):
        raise ConfigError(f"python -m accum launch: {message}; see python -m accum launch --help")

    parser.error = error
    return parser


def launch_main(argv: list[str]) -> int:
    """Entry of `python -m accum launch ...`: check, then run accelerate launch with the same arguments."""
    from accelerate.commands.launch import launch_command_parser

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\naccelerate launch's own arguments:")
        launch_command_parser().print_help()
        return 0
    args = one_line_errors(launch_command_parser()).parse_args(argv)
    data = check_accelerate_config(args.config_file)
    script = args.training_script
    if not args.module and not args.no_python and not os.path.isfile(script):
        raise ConfigError(f"training script {script!r} does not exist: check the path after the launcher's flags")
    if data.get("use_cpu") is True:  # docs/architecture.md: `use_cpu: true` alone does not reach the ranks
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    return run_launcher(launch_command_parser().parse_args(cpu_thread_args(args, data) + argv))
