"""Run a helper script on two CPU gloo ranks through Accelerate's launcher, as the multi-rank tests do."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_on_two_ranks(script: str | Path, *args: str, timeout: float = 300,
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m accelerate.commands.launch --multi_gpu --num_processes 2 SCRIPT ARGS` on the CPU (one thread
    per rank, a free port), `env` added to this process's; asserts that it exited 0 (its stderr tail if not)."""
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                   **(env or {})}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
