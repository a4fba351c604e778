"""Memory estimates: the analytic formula's arithmetic, the search over an estimate, the
command line's errors, and the traced estimate against a real step's memory growth."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from accum.cli.estimate import estimate_main
from accum.errors import ConfigError
from accum.estimate import (
    OPTIMIZER_STATE_BYTES,
    MemoryEstimate,
    estimate_analytic,
    estimate_traced,
    max_micro_batch_for,
)

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "helpers" / "estimate_child.py"
TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 256,
        "bos_token_id": 0, "eos_token_id": 0}
TINY_JSON = json.dumps(TINY)


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


# -- analytic -------------------------------------------------------------------------------


def test_analytic_fp32_adamw_arithmetic():
    params, micro, seq, hidden, layers, vocab = 1_000_000, 4, 128, 256, 6, 5000
    estimate = estimate_analytic(params, micro, seq, hidden_size=hidden, num_layers=layers, vocab_size=vocab,
                                 safety_factor=1.0)
    assert estimate.weights == 4 * params
    assert estimate.gradients == 4 * params
    assert estimate.optimizer_state == 8 * params
    per_token = layers * hidden * 66 + 3 * 4 * vocab
    assert estimate.activations == micro * seq * per_token
    assert estimate.peak == 16 * params + micro * seq * per_token
    assert estimate.total == estimate.peak
    assert estimate.held_between_steps == 12 * params
    assert estimate.step_growth == estimate.peak - 12 * params


def test_analytic_safety_factor_scales_the_total_only():
    plain = estimate_analytic(10**6, 2, 64, hidden_size=128, num_layers=2, safety_factor=1.0)
    padded = estimate_analytic(10**6, 2, 64, hidden_size=128, num_layers=2, safety_factor=1.2)
    assert padded.peak == plain.peak
    assert padded.total == pytest.approx(1.2 * plain.peak, abs=1)
    assert padded.as_dict()["total"] == padded.total


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "lion_8bit", "sgd"])
def test_analytic_optimizer_state_per_parameter(optimizer):
    estimate = estimate_analytic(10**6, 1, 16, hidden_size=64, num_layers=1, optimizer=optimizer)
    assert estimate.optimizer_state == pytest.approx(10**6 * OPTIMIZER_STATE_BYTES[optimizer], abs=1)
    assert OPTIMIZER_STATE_BYTES["adamw"] > OPTIMIZER_STATE_BYTES["adamw_8bit"] > OPTIMIZER_STATE_BYTES["lion_8bit"]
    assert OPTIMIZER_STATE_BYTES["sgd"] == 0


def test_analytic_mixed_precision_halves_activations_and_adds_half_weights():
    kwargs = {"hidden_size": 512, "num_layers": 4, "safety_factor": 1.0}
    fp32 = estimate_analytic(10**6, 8, 256, precision="no", **kwargs)
    bf16 = estimate_analytic(10**6, 8, 256, precision="bf16", **kwargs)
    assert bf16.weights == fp32.weights + 2 * 10**6
    assert bf16.activations == 8 * 256 * 4 * 512 * 34
    assert bf16.activations < fp32.activations


def test_analytic_checkpointing_and_explicit_activation_bytes():
    kwargs = {"hidden_size": 512, "num_layers": 12, "safety_factor": 1.0}
    full = estimate_analytic(10**6, 8, 256, **kwargs)
    checkpointed = estimate_analytic(10**6, 8, 256, gradient_checkpointing=True, **kwargs)
    assert checkpointed.activations == 8 * 256 * (12 * 512 * 4 + 512 * 66)
    assert checkpointed.activations < full.activations / 5
    given_bytes = estimate_analytic(10**6, 8, 256, activation_bytes_per_token=1000, **kwargs)
    assert given_bytes.activations == 8 * 256 * 1000


@pytest.mark.parametrize("bad", [
    {"num_params": 0}, {"micro_batch_size": -1}, {"seq_len": 0}, {"optimizer": "adam"}, {"precision": "fp8"},
    {"safety_factor": 0.5}, {"hidden_size": 0}, {"activation_bytes_per_token": -1.0},
])
def test_analytic_bad_input_is_a_config_error(bad):
    kwargs = {"num_params": 10**6, "micro_batch_size": 1, "seq_len": 16, "hidden_size": 64, "num_layers": 1, **bad}
    with pytest.raises(ConfigError) as info:
        estimate_analytic(kwargs.pop("num_params"), kwargs.pop("micro_batch_size"), kwargs.pop("seq_len"), **kwargs)
    assert "\n" not in str(info.value)


# -- the search over an estimate ----------------------------------------------------------------


def brute_force(estimate, budget, limit):
    return max((n for n in range(1, limit + 1) if estimate(n) <= budget), default=0)


@given(fixed=st.integers(0, 10**9), per_sample=st.integers(1, 10**8), memory=st.integers(1, 10**11),
       limit=st.integers(1, 4096), start=st.integers(1, 64))
@example(fixed=0, per_sample=1, memory=1, limit=48, start=48)  # found in CI: a start far above the answer
def test_search_finds_the_largest_fit_of_an_affine_estimate(fixed, per_sample, memory, limit, start):
    def estimate(n):
        return fixed + per_sample * n

    search = max_micro_batch_for(memory, estimate, limit=limit, start=start, safety_margin=0.0)
    assert search.size == brute_force(estimate, memory, limit)
    sizes = [probe.size for probe in search.probes]
    assert len(sizes) == len(set(sizes)), "a size was evaluated twice"
    assert len(sizes) <= 6  # interpolation lands on an affine boundary almost at once


@given(steps=st.lists(st.integers(0, 10**6), min_size=1, max_size=300), memory=st.integers(1, 10**8),
       limit=st.integers(1, 300), start=st.integers(1, 300))
def test_search_is_exact_for_any_growing_estimate(steps, memory, limit, start):
    totals = [sum(steps[: n % len(steps) + 1]) + (n // len(steps)) * 10**6 for n in range(limit + 2)]
    totals = [max(totals[: n + 1]) for n in range(len(totals))]  # non-decreasing, with plateaus

    def estimate(n):
        return totals[n]

    search = max_micro_batch_for(memory, estimate, limit=limit, start=start, safety_margin=0.0)
    assert search.size == brute_force(estimate, memory, limit)
    assert len(search.probes) <= 4 * (limit.bit_length() + 1)


@given(fixed=st.integers(0, 10**9), per_sample=st.integers(1, 10**8),
       memories=st.lists(st.integers(1, 10**11), min_size=2, max_size=2), limit=st.integers(1, 1024))
def test_search_result_grows_with_the_budget(fixed, per_sample, memories, limit):
    def estimate(n):
        return fixed + per_sample * n

    small, large = sorted(memories)
    assert (max_micro_batch_for(small, estimate, limit=limit).size
            <= max_micro_batch_for(large, estimate, limit=limit).size)


def test_search_counts_the_safety_margin_and_memory_estimate_totals():
    def estimate(n):
        return MemoryEstimate(weights=0, gradients=0, optimizer_state=0, activations=100 * n, held_between_steps=0,
                              safety_factor=1.0)

    assert max_micro_batch_for(1000, estimate, limit=64, safety_margin=0.0).size == 10
    assert max_micro_batch_for(1000, estimate, limit=64, safety_margin=0.1).size == 9
    assert max_micro_batch_for(1000, estimate, limit=5).size == 5
    nothing = max_micro_batch_for(50, estimate, limit=64, safety_margin=0.0)
    assert nothing.size == 0 and [p.size for p in nothing.probes] == [1]


@pytest.mark.parametrize("bad", [{"device_memory_bytes": 0}, {"limit": 0}, {"start": 0}, {"safety_margin": 1.0}])
def test_search_bad_input_is_a_config_error(bad):
    kwargs = {"device_memory_bytes": 10**9, "limit": 8, **bad}
    with pytest.raises(ConfigError):
        max_micro_batch_for(kwargs.pop("device_memory_bytes"), lambda n: n, **kwargs)


# -- traced ------------------------------------------------------------------------------


def test_traced_counts_weights_optimizer_state_and_grows_with_the_batch():
    from transformers import GPT2Config

    config = GPT2Config(**{k: v for k, v in TINY.items() if k != "model_type"})
    one = estimate_traced(config, 1, 64)
    four = estimate_traced(config, 4, 64)
    params = 1000 * 64 + 256 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64  # tied embeddings counted once
    assert one.weights == 4 * params
    assert one.optimizer_state >= 8 * params  # exp_avg + exp_avg_sq (+ step counters)
    assert one.held_between_steps >= one.weights + 8 * params
    assert one.method == "traced" and one.total == one.peak
    # activations scale with the batch: four samples cost about four times one sample's growth
    assert four.step_growth == pytest.approx(4 * one.step_growth, rel=0.1)


def test_traced_8bit_optimizer_holds_a_quarter_of_adamw_state():
    adamw = estimate_traced(TINY_JSON, 1, 32)
    adamw_8bit = estimate_traced(TINY_JSON, 1, 32, optimizer="adamw_8bit")
    sgd = estimate_traced(TINY_JSON, 1, 32, optimizer="sgd")
    assert sgd.held_between_steps == sgd.weights
    assert 0.2 < (adamw_8bit.held_between_steps - adamw_8bit.weights) / (adamw.held_between_steps - adamw.weights) < 0.3


def test_traced_untraceable_model_is_a_config_error():
    import torch

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.linear(x)
            return y[y > 0].sum()  # output shape depends on values

    with pytest.raises(ConfigError, match="analytic"):
        estimate_traced(DataDependent, 2, 4, make_batch=lambda b, s: {"x": torch.randn(b, 4)})


# -- command line ----------------------------------------------------------------------------


def test_estimate_main_analytic_prints_the_plan_line(capsys, tiny_config_file):
    code = estimate_main(["--model", tiny_config_file, "--seq-len", "128", "--batch-size", "256",
                          "--device-memory", "1GiB", "--method", "analytic"])
    out = capsys.readouterr().out
    assert code == 0
    line = [text for text in out.splitlines() if text.startswith("Effective batch size: 256 = ")]
    assert line and line[0].endswith("x 1 process")


def test_estimate_main_traced_json_multiplies_out(capsys):
    code = estimate_main(["--model", TINY_JSON, "--seq-len", "64", "--batch-size", "96", "--device-memory", "200MiB",
                          "--num-processes", "2", "--json"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["micro_batch_size"] * plan["accumulation_steps"] * plan["num_processes"] == 96
    assert plan["source"] == "estimate" and plan["method"] == "traced"
    assert plan["micro_batch_size"] <= plan["max_micro_batch"] <= 48
    assert plan["estimate_at_max_micro_batch"]["total"] <= plan["device_memory_budget"]


@pytest.mark.parametrize("argv", [
    ["--batch-size", "0"],
    ["--batch-size", "-4"],
    ["--seq-len", "many"],
    ["--device-memory", "80XB"],
    ["--device-memory", "0.5"],
    ["--device-memory", "1MiB"],
    ["--method", "guess"],
    ["--optimizer", "adam"],
    ["--mixed-precision", "fp8"],
    ["--task", "translation"],
    ["--seq-len", "100000"],
    ["--num-processes", "3"],
    ["--batch-size", "1", "--num-processes", "2"],
    ["--model", "/nonexistent/model"],
    ["--model", "{not json"],
    ["--model", '{"n_layer": 2}'],
    ["--unknown-flag", "1"],
])
def test_estimate_main_bad_input_exits_2_with_one_line(capsys, argv, tiny_config_file):
    base = {"--model": tiny_config_file, "--seq-len": "64", "--batch-size": "64", "--device-memory": "1GiB",
            "--method": "analytic"}
    given_flags = dict(zip(argv[::2], argv[1::2], strict=True))
    args = [item for flag, value in {**base, **given_flags}.items() for item in (flag, value)]
    code = estimate_main(args)
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if not line.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err


# -- the trace against a real step -------------------------------------------------------------


@pytest.mark.slow
def test_traced_estimate_matches_real_growth_of_resident_memory():
    """One AdamW step of a small GPT-2 at 16 x 256 grows resident memory by ~0.64 GB (a
    vocabulary of 8192 makes the logits big while the step stays quick). The child measures
    after a warm-up step, with glibc returning freed blocks of 64 KiB and more to the system."""
    from transformers import GPT2Config

    gpt2 = {"n_embd": 128, "n_layer": 2, "n_head": 4, "vocab_size": 8192, "n_positions": 256}
    spec = {"config": gpt2, "micro_batch_size": 16, "seq_len": 256, "optimizer": "adamw"}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, str(CHILD), json.dumps(spec)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    real = json.loads(child.stdout.strip().splitlines()[-1])
    assert real["growth"] >= 0.5e9, real

    traced = estimate_traced(GPT2Config(**gpt2), 16, 256, optimizer="adamw")
    assert traced.step_growth == pytest.approx(real["growth"], rel=0.15), (traced.as_dict(), real)


def test_estimate_names_every_gradient_and_states_the_analytic_factor(capsys):
    # a vocabulary this large puts the traced peak early in backward, before most gradients exist
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 8192, "n_positions": 128,
              "bos_token_id": 0, "eos_token_id": 0}
    common = ["--model", json.dumps(config), "--seq-len", "128", "--batch-size", "16", "--device-memory", "4GiB"]
    assert estimate_main(common + ["--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["estimate_at_max_micro_batch"]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    params = sum(p.numel() for p in model.parameters())
    assert chosen["gradients_total"] == 4 * params > chosen["gradients"]  # fp32: all of them, not the peak's share
    assert chosen["safety_factor"] == 1.0 and chosen["total"] == chosen["peak"]
    assert estimate_main(common) == 0
    out = capsys.readouterr().out
    assert f"gradients {4 * params / 2**20:.2f} MiB (" in out and "allocated at the step's peak" in out
    assert estimate_main(common + ["--method", "analytic"]) == 0
    assert "x 1.2 (the analytic formula's allowance" in capsys.readouterr().out
