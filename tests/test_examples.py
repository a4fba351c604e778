"""examples/: each loop runs as written on a tiny model and does what its docstring says."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_exact_accumulation_plans_an_accumulating_split_and_trains_every_sample():
    out = run_example("exact_accumulation.py", "--epochs", "1")
    micro, accum = map(int, re.search(r"Effective batch size: 64 = (\d+) micro x (\d+) accum x 1 process", out).groups())
    assert micro * accum == 64 and accum >= 2  # the 24 MiB budget holds fewer than 64 samples
    steps = re.findall(r"step \d+: loss [\d.]+ on (\d+) samples", out)
    assert sum(map(int, steps)) == 500 and len(steps) == 8  # 7 windows of 64 and a partial one of 52


@pytest.mark.slow
def test_oom_recovery_replays_at_half_the_micro_batch_and_the_noise_scale_appears():
    out = run_example("oom_recovery_and_noise_scale.py", "--simulate-oom", "4", "--steps", "11")
    assert "step 1: micro-batch 8 -> 4, accumulation 4 -> 8 (effective batch 32 unchanged)" in out
    assert out.count("micro-batch 4, B_simple") == 11  # every step trained, at the recovered size
    assert "B_simple not known yet" in out.splitlines()[2] and re.search(r"step 11: .* B_simple \d+ tokens", out)


@pytest.mark.slow
def test_causal_lm_counts_tokens_with_a_next_token_and_evaluates_once():
    out = run_example("causal_lm_padded.py", "--steps", "3")
    rows = re.findall(r"step \d+: loss ([\d.]+) per token over (\d+) tokens \((\d+) real", out)
    assert len(rows) == 3
    for _, items, real in rows:
        assert 0 < int(items) < int(real) <= int(items) + 8  # one token per line has no next token
    assert re.search(r"held-out loss [\d.]+ over \d+ tokens", out)
