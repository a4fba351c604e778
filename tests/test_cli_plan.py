"""`python -m accum plan`: bad input is one line and exit code 2; a tiny GPT-2 gets a correct plan in seconds."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accum.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000,
             "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny-gpt2.json"
    path.write_text(json.dumps(TINY_GPT2))
    return path


@pytest.mark.parametrize("argv, words", [
    (["plan", "--model", "gpt2-tiny", "--batch-size", "0"], "must be positive"),
    (["plan", "--model", "gpt2-tiny", "--batch-size", "-4"], "must be positive"),
    (["plan", "--model", "gpt2-tiny", "--batch-size", "3", "--num-processes", "4"], "smaller than the 4 processes"),
    (["plan", "--model", "gpt2-tiny", "--batch-size", "10", "--num-processes", "4"], "8 or 12"),
    (["plan", "--model", "gpt2-tiny", "--batch-size", "8", "--objective", "fastest"], "unknown"),
    (["plan", "--model", "gpt2-tiny", "--batch-size", "8", "--max-memory", "lots"], "not a size"),
    (["plan", "--model", "no/such/model", "--batch-size", "8"], "neither a model directory"),
    (["plan", "--batch-size", "8"], "--model"),
    (["plann"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_seq_len_beyond_the_model_is_one_line(config_file, capsys):
    assert main(["plan", "--model", str(config_file), "--batch-size", "8", "--seq-len", "4096", "--no-cache"]) == 2
    assert "128 positions" in capsys.readouterr().err


def test_estimate_is_dispatched_lazily(monkeypatch, capsys):
    import types

    fake = types.ModuleType("accum.estimate")
    fake.estimate_main = lambda argv: 0 if argv == ["--help-me"] else 1
    monkeypatch.setitem(sys.modules, "accum.estimate", fake)
    assert main(["estimate", "--help-me"]) == 0


@pytest.mark.slow
def test_plan_on_tiny_gpt2_config_in_seconds(config_file, tmp_path):
    cache = tmp_path / "plans.json"
    command = [sys.executable, "-m", "accum", "plan", "--model", str(config_file), "--seq-len", "32",
               "--batch-size", "48", "--max-memory", "4GiB", "--cache", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    done = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    seconds = time.perf_counter() - began
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert plan["micro_batch_size"] * plan["accumulation_steps"] * plan["num_processes"] == 48
    assert plan["effective_batch_size"] == 48 and plan["source"] == "probe"
    assert max(p["size"] for p in plan["probes"]) <= 48
    assert seconds < 90, seconds
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "no probes" in again.stdout
    banner = f"Effective batch size: 48 = {plan['micro_batch_size']} micro x {plan['accumulation_steps']} accum x 1 process"
    assert again.stdout.strip().splitlines()[-1] == banner
