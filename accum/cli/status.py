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
from pathlib import Path
from typing import Any

from accum.files import write_json_atomic

STATUS_FILE = "status.json"


class ExitStatus(enum.IntEnum):
    """Exit codes of scripts/train.py (and of `python -m accum launch`, which hands them back).
    Every one but OK and CRASHED comes with one `error:` line that says what to do."""

    OK = 0
    CRASHED = 1  # an error nobody explained: a bug; the traceback (with --debug) says where
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
    try:
        data = json.loads((Path(output_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("exit_code"), int) else None
