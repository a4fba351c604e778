"""Stop a run cleanly on SIGTERM or SIGINT (a pre-empted cloud job, Ctrl-C).

The handler only records the signal; the training loop asks `StopRequest.agreed()`
between optimizer steps, so the step in flight finishes and the state saved is a
whole one. With several ranks a signal may reach one rank only, or reach them at
different steps: `agreed()` all-reduces the flag (one int, max over ranks), so every
rank stops after the same optimizer step. A second signal stops at once, unless it comes within
`duplicate_window_s` of the first: Ctrl-C reaches every process of the terminal's process group and
launchers pass it on as well, so one request often arrives twice in a few milliseconds.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Stopped on a signal at a safe point; `exit_code` is 128 + the signal number.

    `phase` None: training, after a whole optimizer step (`optimizer_step`), its state saved as
    `checkpoint`. Otherwise the phase it stopped in ('data preparation', 'planning', 'evaluation'),
    with `checkpoint` the state saved before it, if any."""

    def __init__(self, signum: int, optimizer_step: int | None = None, checkpoint: Any = None,
                 phase: str | None = None, then: str | None = None):
        self.signum, self.optimizer_step, self.checkpoint, self.phase = signum, optimizer_step, checkpoint, phase
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        if checkpoint:
            default_then = f"checkpoint {checkpoint}; continue with `resume_from_checkpoint` latest"
        elif phase is None:
            default_then = "nothing new to save; continue with `resume_from_checkpoint` latest"
        else:
            default_then = "nothing was trained or saved: run the same command again"
        then = then or default_then
        where = f"after optimizer step {optimizer_step}" if phase is None else f"during {phase}"
        if phase is not None and optimizer_step:
            where += f" (after optimizer step {optimizer_step})"
        super().__init__(f"stopped by {name} {where}; {then}")


class Stopped(Exception):
    """Raised by a library loop (probing, evaluation, data preparation) when its `should_stop()`
    callable returned True; the caller knows which signal asked and turns it into Interrupted."""


class StopRequest:
    """Context manager: while inside, SIGTERM/SIGINT set a flag instead of killing the process.

    Handlers are installed only in the main thread (Python allows no other) and the
    previous ones come back on exit.
    """

    duplicate_window_s = 1.0

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        # what the run does now, for the line printed when a signal comes ('training' stops after the step)
        self.phase = "training"
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._received_at < self.duplicate_window_s:
                return  # the same request delivered twice (process group and launcher)
            self.restore()  # asked twice: stop now, the way the process would have without us
            signal.raise_signal(signum)
            return
        self.signum, self._received_at = signum, time.monotonic()
        when = ("after this optimizer step and saving a checkpoint" if self.phase == "training"
                else f"{self.phase} at the next safe point")
        print(f"received {signal.Signals(signum).name}: stopping {when} "
              "(send it again, a second or more later, to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether this process received a stop signal (no collective: a `should_stop` for library loops)."""
        return self.signum is not None

    def agreed(self, accelerator) -> int | None:
        """The signal any rank received (the same answer on every rank), or None to go on.

        One all-reduce of one integer when there are several processes; none otherwise.
        """
        received = self.signum or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([received], device=accelerator.device)
            received = int(accelerator.reduce(flag, "max").item())
        return received or None
