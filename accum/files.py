"""Atomic writes: a file is either its old contents or its new ones, never half of either; and
bounded reads, so that a file of unknown size (a FIFO, /dev/zero, a hand-made bomb) cannot take all
memory.

The one implementation for the plan cache, run files (config, plan, metrics, status) and
checkpoint state: write a temporary file beside the target, flush it to disk, keep the target's
permission bits, rename it over the target, and remove the temporary on any failure. A full disk
may fail without an OSError (safetensors, torch.save raise RuntimeError): every failure is turned
into OSError here, so callers catch one thing. `atomic_directory` does the same for a directory of
files (the final model export), and `make_readable` gives files that a library wrote 0600
(safetensors, mkstemp) the mode any new file gets, so a run's output is readable as a whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically. Raises OSError (the target is then unchanged)."""
    path = Path(path)
    mode = _mode_of(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) or not isinstance(exc, Exception):
            raise
        raise as_os_error(exc, path) from exc


def as_os_error(exc: BaseException, path: str | Path) -> OSError:
    """A failed write as the OSError it is: safetensors raises SafetensorError ('... (os error 28)') and
    torch.save RuntimeError ('unexpected pos 576 vs 534') on a full disk. The errno is the one the
    message names, else ENOSPC when the file system has no space left, else EIO."""
    if isinstance(exc, OSError):
        return exc
    import re

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    named = re.search(r"os error (\d+)", text)
    if named:
        code = int(named.group(1))
    else:
        code = errno.EIO
        with contextlib.suppress(OSError):
            if os.statvfs(Path(path).parent).f_bavail == 0:
                code = errno.ENOSPC
    error = OSError(code, os.strerror(code), str(path))
    error.__cause__ = exc if isinstance(exc, Exception) else None
    return error


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """JSON (indented, non-JSON values as strings) written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def new_file_mode() -> int:
    """What open() gives a new file under the process's umask (0644 with the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _mode_of(path: Path) -> int:
    """The target's permission bits, or what a new file gets under the process's umask (0644 by
    default): a rewrite never narrows a file others read to 0600 (mkstemp's own mode)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return new_file_mode()


def make_readable(directory: str | Path) -> None:
    """Give every file under `directory` the mode a new file gets (umask), and flush it to disk.
    safetensors writes through a 0600 temporary file, so without this a checkpoint's weights would be
    the one file of a run its group cannot read."""
    mode = new_file_mode()
    for item in sorted(Path(directory).rglob("*")):
        if item.is_file() and not item.is_symlink():
            os.chmod(item, mode)
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())


def fsync_directory(path: str | Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk: without it a crash can lose
    a rename that os.replace already returned from."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Write a directory that appears complete or not at all: yields an empty temporary directory beside
    `path` to fill; when the block ends without an error its files are made readable (`make_readable`)
    and flushed, and it is renamed to `path`, replacing an older one (moved aside first, then deleted:
    a kill in between leaves the older one under `.trash-<name>`, never a half-written `path`). On an
    error the temporary is removed and `path` is untouched; a failure that is not an OSError (a library
    that cannot write on a full disk) is raised as one."""
    path = Path(path)
    tmp, trash = path.with_name(f"{TEMP_PREFIX}{path.name}"), path.with_name(f".trash-{path.name}")
    for leftover in (tmp, trash):  # of a writer killed before
        shutil.rmtree(leftover, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        make_readable(tmp)
        fsync_directory(tmp)
        if path.exists():
            os.replace(path, trash)
        os.replace(tmp, path)
        fsync_directory(path.parent)
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or not isinstance(exc, Exception):
            raise
        raise OSError(f"writing {path} failed: {exc}") from exc


def remove_stale_temporaries(directory: str | Path, name: str, older_than_s: float = 600.0) -> None:
    """Temporaries of `name` left in `directory` by a writer killed mid-write: those not touched for
    `older_than_s` seconds (a live writer's own temporary is younger, and stays)."""
    import time

    now = time.time()
    with contextlib.suppress(OSError):
        for item in Path(directory).iterdir():
            if item.name.startswith(f"{TEMP_PREFIX}{name}.") and item.is_file():
                with contextlib.suppress(OSError):
                    if now - item.stat().st_mtime > older_than_s:
                        item.unlink()


def read_bounded(path: str | Path, limit: int) -> bytes:
    """At most `limit` bytes of `path`, read in chunks. Raises FileTooLarge (an OSError, errno EFBIG)
    when there is more: the size a stat reports is not trusted (a FIFO or a /proc file says 0)."""
    chunks, size = [], 0
    with open(path, "rb") as handle:
        while chunk := handle.read(min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return b"".join(chunks)


class FileTooLarge(OSError):
    """A file read with `read_bounded` holds more than its limit."""
