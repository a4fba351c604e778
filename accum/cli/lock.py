"""One owner per output directory: `<output_dir>/.accum.lock`, holding the owner's pid and host.

Taken by the main process before it writes anything into the directory, with O_CREAT|O_EXCL (two
runs cannot both succeed). A lock left by a dead process on this host is taken over with one line
on stderr; a live owner, or an owner on another host (its pid means nothing here), refuses the run
with a ConfigError and nothing written. Released when the run ends.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path

from accum.errors import ConfigError

LOCK_FILE = ".accum.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class OutputLock:
    """`acquire()` then `release()`; `created_dir` says whether this run created the directory."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_FILE
        self.held = False
        self.created_dir = False

    def check(self) -> None:
        """Refuse (ConfigError) when another live run owns the directory; reads only, creates nothing."""
        if self.path.exists():
            owner = self._owner()
            if owner is not None:
                self._refuse_if_owned(owner)

    def _refuse_if_owned(self, owner: dict) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        if owner.get("host") != me["host"]:
            raise ConfigError(f"output dir {str(self.dir)!r} is in use by pid {owner.get('pid')} on host "
                              f"{owner.get('host')!r} ({self.path}): choose another --output-dir, or delete "
                              "the lock once that run has ended") from None
        if owner.get("pid") != me["pid"] and _alive(int(owner.get("pid", 0))):
            raise ConfigError(f"output dir {str(self.dir)!r} is in use by a running process (pid "
                              f"{owner.get('pid')}): wait for it to end, or choose another --output-dir") from None

    def acquire(self) -> OutputLock:
        """Take the lock, creating the directory if needed. Raises ConfigError when another run owns it."""
        self.created_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # half-written by a writer that died between create and write
                    self._take_over("an unreadable lock")
                    continue
                self._refuse_if_owned(owner)
                self._take_over(f"the lock of pid {owner.get('pid')}, which has ended")
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise ConfigError(f"output dir {str(self.dir)!r}: could not take {self.path}; check who else writes there")

    def _owner(self) -> dict | None:
        from accum.files import read_bounded

        try:
            data = json.loads(read_bounded(self.path, 1 << 16))  # a pid and a host: a few dozen bytes
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None

    def _take_over(self, what: str) -> None:
        print(f"note: output dir {self.dir}: taking over {what}", file=sys.stderr, flush=True)
        try:
            self.path.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if (self._owner() or {}).get("pid") == os.getpid():
                    self.path.unlink()
            except OSError:
                pass
