"""bench/gpu_bench.py runs on a machine without a GPU too (the CPU, a tiny model, a memory cap), so
it is ready when one is lent: its report holds every figure its sections promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_planner_section_reports_the_search_against_fresh_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "bench/gpu_bench.py", "--sections", "planner", "--out", str(tmp_path),
                           "--steps", "3", "--long-steps", "10", "--accelerate-start", "64"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (report_file,) = tmp_path.glob("*-gpu-bench-cpu*.json")
    planner = json.loads(report_file.read_text())["sections"]["planner"]
    assert planner["workload"] == "tiny" and planner["cap_bytes"] == 236 * 2**20
    fresh, zero, default = planner["fresh_process_maximum"], planner["margin_0"]["size"], planner["margin_default"]["size"]
    assert fresh is not None and zero >= 0.95 * fresh  # the CPU target of the planner issue
    assert 1 <= default <= zero + 1  # a margin never plans larger (on the CPU the cap, not the budget, decides)
    assert planner["margin_0_trains"] and planner["default_margin_trains_long"]
    assert 1 <= planner["accelerate"]["size"] <= 64 and planner["accelerate"]["probes"] >= 1
    assert all(str(size) in planner["fresh_checks"] for size in planner["bisection_range"])
    assert "accum, safety margin 0 |" in (tmp_path / report_file.name.replace(".json", ".md")).read_text()


def test_speed_section_times_train_py_a_plain_loop_and_trainer_on_the_same_blocks(tmp_path):
    """The speed section on the CPU (a tiny GPT-2, no compile arms): every arm trained and was timed,
    the ratios are of those medians, and the sync check says why it did not run here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "bench/gpu_bench.py", "--sections", "speed", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (report_file,) = tmp_path.glob("*-gpu-bench-cpu*.json")
    speed = json.loads(report_file.read_text())["sections"]["speed"]
    rates = speed["tokens_per_s"]
    assert set(rates) == {"train.py", "train.py --noise-scale", "plain loop", "Trainer"}
    assert all(row["median"] > 0 and row["n"] == speed["workload"]["repeats"] for row in rates.values())
    assert speed["ratios"]["train.py / plain loop"] == pytest.approx(rates["train.py"]["median"] / rates["plain loop"]["median"])
    # a tiny model (windows of ~25 ms, where train()'s fixed per-window work shows; 0.77 measured here) on a
    # shared CPU: only a sanity band, which a loop at a third of the plain loop's speed fails
    assert 0.33 < speed["ratios"]["train.py / plain loop"] < 3.0
    assert "skipped" in speed["host_syncs"] and speed["non_embedding_parameters"] > 0
    assert "| train.py | " in (tmp_path / report_file.name.replace(".json", ".md")).read_text()


def test_engines_section_skips_cleanly_without_a_gpu_and_says_why(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_bench import engine_skip_reason

    assert engine_skip_reason("FSDP", cuda=True, deepspeed_installed=False) is None
    assert "not installed" in engine_skip_reason("DeepSpeed", cuda=True, deepspeed_installed=False)
    assert engine_skip_reason("DeepSpeed", cuda=True, deepspeed_installed=True) is None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "bench/gpu_bench.py", "--sections", "engines", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (report_file,) = tmp_path.glob("*-gpu-bench-cpu*.json")
    engines = json.loads(report_file.read_text())["sections"]["engines"]
    assert set(engines) == {"FSDP", "DeepSpeed"}
    assert all("no CUDA device" in row["skipped"] for row in engines.values())
    assert "| FSDP | skipped: no CUDA device" in (tmp_path / report_file.name.replace(".json", ".md")).read_text()
