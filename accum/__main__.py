"""`python -m accum`: the command line lives in accum.cli (accum.cli.main)."""

import os
import signal
import sys


def _stop_at_once(signum, frame):  # noqa: ARG001 - a signal handler's signature
    """Until a command installs its own handling (importing torch alone takes seconds): one line and
    128 + the signal, never a traceback; nothing of ours is half-written (every write is atomic)."""
    os.write(2, f"error: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _stop_at_once)

from accum.cli.main import main  # noqa: E402 - after the handlers: this import takes seconds

if __name__ == "__main__":
    sys.exit(main())
