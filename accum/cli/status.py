"""How a run ended, said once: the exit-status enum shared by scripts/train.py, `python -m accum
launch` and the sweep, and `<output_dir>/status.json`, which train.py writes atomically whenever it
owns its output directory and the sweep reads instead of scraping stderr.

status.json: {"status": "ok" | "bad_input" | ..., "exit_code": int, "reason": one line or null,
"metrics": the final metrics or null, "pid": ..., "host": ...}.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from accum.files import write_json_atomic

STATUS_FILE = "status.json"


class ExitStatus(enum.IntEnum):
    """Exit codes of scripts/train.py (and of `python -m accum launch`, which hands them back).
    Every one but OK and CRASHED comes with one `error:` line that says what to do."""

    OK = 0
    CRASHED = 1  # an error nobody explained: a bug; one line names it, --debug shows the traceback
    BAD_INPUT = 2  # a value, file or checkpoint that cannot be used; nothing was written
    NONFINITE = 3  # a NaN/inf loss or gradient; the last finite state is saved
    OUT_OF_MEMORY = 4  # at micro-batch 1 or in the optimizer step; the state before is saved
    IO_ERROR = 5  # a write failed (disk full, read-only); complete checkpoints are kept
    LOST_RANK = 6  # another process died or timed out
    INTERRUPTED_INT = 130  # SIGINT: the step finished and was saved
    INTERRUPTED_TERM = 143  # SIGTERM: the step finished and was saved

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def explained(cls) -> frozenset[int]:
        """The codes whose cause the script itself printed in one line."""
        return frozenset(code.value for code in cls if code not in (cls.OK, cls.CRASHED))

    @classmethod
    def describe(cls, code: int) -> str:
        """'bad_input' for 2, 'signal 9' for -9 or 137, 'exit 77' for anything else."""
        if code in cls._value2member_map_:
            return cls(code).label
        if code < 0 or code > 128:
            return f"signal {-code if code < 0 else code - 128}"
        return f"exit {code}"


def write_status(output_dir: str | Path, code: int, reason: str | None = None,
                 metrics: dict[str, Any] | None = None) -> Path:
    """Write <output_dir>/status.json atomically; returns its path. Call only as the directory's owner."""
    path = Path(output_dir) / STATUS_FILE
    write_json_atomic(path, {"status": ExitStatus.describe(code), "exit_code": int(code), "reason": reason,
                             "metrics": metrics, "pid": os.getpid(), "host": socket.gethostname()})
    return path


def read_status(output_dir: str | Path) -> dict[str, Any] | None:
    """status.json of a run, or None when there is none (or it cannot be read: a run killed before
    it wrote one)."""
    from accum.files import read_bounded

    try:  # a status, a line and the final metrics: well under its bound
        data = json.loads(read_bounded(Path(output_dir) / STATUS_FILE, 64 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("exit_code"), int) else None


DEBUG_FLAG = "--debug"
CRASH_FIX = f"a bug: run again with {DEBUG_FLAG} for the traceback, and report it"


def exit_status_of(exc: BaseException, io_fix: str = "free space or choose another path, then run again"
                   ) -> tuple[ExitStatus, str]:
    """How an exception ends a command: its exit status and one line saying what happened and what to
    do. Library messages name parameters in backticks; here they become flags (accum.cli.config.flags_in).
    `io_fix` ends the line of a failed write (train.py: free space, then resume)."""
    from accum.cli.config import flags_in
    from accum.errors import ConfigError, first_line
    from accum.recovery import OutOfMemoryError
    from accum.signals import Interrupted

    if isinstance(exc, ConfigError):
        return ExitStatus.BAD_INPUT, flags_in(first_line(exc, 600) if str(exc) else type(exc).__name__)
    if isinstance(exc, OutOfMemoryError):
        return ExitStatus.OUT_OF_MEMORY, flags_in(str(exc))
    if isinstance(exc, FloatingPointError):  # train.py's line says what to resume from
        return ExitStatus.NONFINITE, flags_in(str(exc))
    if isinstance(exc, Interrupted):
        return ExitStatus(exc.exit_code), flags_in(str(exc))
    if isinstance(exc, KeyboardInterrupt):  # SIGINT twice: the second stops at once
        return ExitStatus.INTERRUPTED_INT, "stopped by SIGINT at once (asked twice): the step in flight was not saved"
    if isinstance(exc, OSError):  # disk full, read-only, quota: complete files are untouched
        where = f" {exc.filename}" if exc.filename else ""
        return ExitStatus.IO_ERROR, f"I/O failed{where}: {exc.strerror or first_line(exc)}; {io_fix}"
    if isinstance(exc, RuntimeError) and lost_another_rank(exc):
        return ExitStatus.LOST_RANK, (f"lost contact with another rank ({first_line(exc)}); every rank stopped. "
                                      "Resume with --resume-from-checkpoint latest; --dist-timeout-s bounds this wait")
    return ExitStatus.CRASHED, f"crashed with {type(exc).__name__}: {first_line(exc)} ({CRASH_FIX})"


def lost_another_rank(exc: RuntimeError) -> bool:
    """A collective failed because a peer died or timed out (gloo/NCCL raise RuntimeError subclasses)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "timed out", "connection closed", "connection reset"))


def report_failure(exc: BaseException, debug: bool = False, **kwargs: Any) -> int:
    """Print how `exc` ended the command, as one `error:` line on stderr (the traceback first, with
    `debug`), and return its exit code. SystemExit passes through (argparse's --help)."""
    if isinstance(exc, SystemExit):
        raise exc
    code, reason = exit_status_of(exc, **kwargs)
    if debug:
        traceback.print_exception(exc)
    print(f"error: {reason}", file=sys.stderr, flush=True)
    return int(code)
