"""Test-wide settings: offline hub, one thread (the suite shares 2 cores), repo root importable."""

import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# A shell starts a background job (`make test &`) with SIGINT ignored, Python keeps an ignored SIGINT
# ignored, and every child inherits it: the tests of Ctrl-C (a second SIGINT stops at once; a sweep
# stops on Ctrl-C) then fail for the harness, not the code. The suite runs as it would from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from hypothesis import settings  # noqa: E402

# CI (CI=true) replays the same examples every run, so that a submission's result does not depend
# on the draw; locally, hypothesis keeps exploring new examples (and reported two real bugs that way).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state and refuses another precision once it exists: an earlier
    in-process run in this pytest process set fp32. A fresh state before (and after, for the next test)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
