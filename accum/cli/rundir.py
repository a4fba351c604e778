"""What a run owns in its output directory, and who owns it: the run id, and an overwritten run moved aside.

A fresh run gets a new id, written to `<output_dir>/run.json` and into every checkpoint's state.json;
a resumed run keeps its checkpoint's id. So `latest` and the rotation of old checkpoints
(scripts/checkpoint.py) only ever see the checkpoints of the run that owns the directory, and a
checkpoint of another run is never resumed into it. `--overwrite` starts clean: before the new run
writes anything, the old run's files move to `<output_dir>/.overwritten-<UTC time>/` (a rename on the
same file system: nothing is copied and nothing is deleted; delete that directory when it is not needed).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from accum.errors import ConfigError
from accum.files import FileTooLarge, fsync_directory, read_bounded, write_json_atomic

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
# The tracker's project name (accelerator.init_trackers): TensorBoard writes <output_dir>/accum/.
TRACKER_DIR = "accum"
# The trained model in save_pretrained layout, written at the end of a run (scripts/train.py).
FINAL_DIR = "final"
# What a run writes into its output directory (besides the lock, .accum.lock): these move aside together.
RUN_OUTPUTS = (CHECKPOINTS, "metrics.jsonl", "metrics.json", "status.json", "config.json", "plan.json", RUN_FILE,
               TRACKER_DIR, FINAL_DIR)
# What a run trained: a directory holding any of these holds results that a fresh start must not replace.
RESULTS = (CHECKPOINTS, "metrics.jsonl", "metrics.json", FINAL_DIR)
OVERWRITTEN_PREFIX = ".overwritten-"
MAX_RUN_FILE_BYTES = 1 << 16  # run.json holds an id, a pid, a host and a time


def new_run_id() -> str:
    return uuid.uuid4().hex


def read_run_id(output_dir: str | Path) -> str | None:
    """The id of the run that owns `output_dir` (its run.json), or None when there is none. Raises
    ConfigError for a run.json that cannot be read: the owner is then unknown."""
    path = Path(output_dir) / RUN_FILE
    try:
        data = json.loads(read_bounded(path, MAX_RUN_FILE_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        reason = "too large" if isinstance(exc, FileTooLarge) else (getattr(exc, "strerror", None) or str(exc))
        raise ConfigError(f"{path} cannot be read ({reason}): it says which run owns the directory; "
                          "restore it, or start in another `output_dir`") from None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"{path} names no run id: it says which run owns the directory; restore it, or start "
                          "in another `output_dir`")
    return run_id


def write_run_file(output_dir: str | Path, run_id: str) -> None:
    write_json_atomic(Path(output_dir) / RUN_FILE, {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                                                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def results_in(output_dir: str | Path) -> list[str]:
    """The names of RESULTS present in `output_dir` (an empty checkpoints directory does not count)."""
    out = Path(output_dir)
    found = []
    for name in RESULTS:
        path = out / name
        if path.is_dir() and any(path.iterdir()) or path.is_file():
            found.append(name)
    return found


def check_layout(output_dir: str | Path) -> None:
    """Refuse (ConfigError) a directory where the run could write only after training: a file where the
    checkpoints directory goes, a directory where a run file goes."""
    out = Path(output_dir)
    for name, what in ((CHECKPOINTS, "checkpoints are saved"), (FINAL_DIR, "the trained model is exported")):
        if (out / name).exists() and not (out / name).is_dir():
            raise ConfigError(f"{out / name} exists and is not a directory: {what} there; move it away "
                              "or choose another `output_dir`")
    for name in RUN_OUTPUTS:
        path = out / name
        if name not in (CHECKPOINTS, TRACKER_DIR, FINAL_DIR) and path.is_dir():
            raise ConfigError(f"{path} is a directory: the run writes a file there; move it away or choose another "
                              "`output_dir`")


def move_aside(output_dir: str | Path) -> Path | None:
    """Move the files of the run in `output_dir` (RUN_OUTPUTS) into a new `.overwritten-<UTC time>/`
    beside them; return it, or None when there was nothing to move. Raises OSError."""
    out = Path(output_dir)
    present = [out / name for name in RUN_OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = out / f"{OVERWRITTEN_PREFIX}{stamp}"
    suffix = 1
    while target.exists():  # two overwrites in one second
        suffix += 1
        target = out / f"{OVERWRITTEN_PREFIX}{stamp}-{suffix}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    fsync_directory(out)
    return target


def owner_of_checkpoint(state: dict[str, Any]) -> str | None:
    """The run id a checkpoint's state names (None: a checkpoint written before run ids existed)."""
    run_id = state.get("run_id")
    return run_id if isinstance(run_id, str) and run_id else None
