"""AccumulationStats: counters, bias-corrected EMA loss, throughput, memory, summary and resume."""

import json
import time

import pytest
import torch

from accum import stats as stats_module
from accum.stats import AccumulationStats, peak_memory


def run_windows(
    stats: AccumulationStats, losses: list[float], accum: int = 2, samples: int = 4, tokens: int = 40
):
    records = []
    for i, loss in enumerate(losses):
        for _ in range(accum):
            stats.record_micro_batch(samples=samples, tokens=tokens)
        time.sleep(0.002)  # a measurable interval for the throughput
        records.append(stats.record_optimizer_step(loss, grad_norm=0.5 + i, lr=1e-3))
    return records


def test_counters_follow_micro_batches_and_windows():
    stats = AccumulationStats()
    records = run_windows(stats, [2.0, 1.0, 0.5], accum=4, samples=2, tokens=30)
    assert (stats.micro_step, stats.optimizer_step) == (12, 3)
    assert (stats.samples_seen, stats.tokens_seen) == (24, 360)
    last = records[-1]
    assert (last["optimizer_step"], last["micro_step"], last["samples_seen"], last["tokens_seen"]) == (
        3,
        12,
        24,
        360,
    )
    assert stats.grad_norm_history == [0.5, 1.5, 2.5]
    assert last["lr"] == 1e-3 and last["grad_norm"] == 2.5 and last["loss"] == 0.5


def test_ema_loss_is_bias_corrected():
    stats = AccumulationStats(ema_beta=0.9)
    assert stats.ema_loss is None
    first = stats.record_optimizer_step(3.0)
    assert first["ema_loss"] == pytest.approx(3.0)  # the first value, not 0.1 x 3
    second = stats.record_optimizer_step(1.0)
    raw = 0.9 * 0.3 + 0.1 * 1.0
    assert second["ema_loss"] == pytest.approx(raw / (1 - 0.9**2))


def test_tensors_are_accepted_and_non_finite_values_skipped():
    stats = AccumulationStats(ema_beta=0.5)
    stats.record_optimizer_step(torch.tensor(2.0), grad_norm=torch.tensor(1.0))
    record = stats.record_optimizer_step(torch.tensor(float("inf")), grad_norm=float("nan"), skipped=True)
    assert record["loss"] is None and record["grad_norm"] is None and record["skipped"]
    assert stats.ema_loss == pytest.approx(2.0)  # the overflowed step does not poison the average
    assert stats.skipped_steps == 1 and stats.optimizer_step == 2
    assert stats.grad_norm_history == [1.0, None]
    json.dumps(stats.as_dict(), allow_nan=False)


def test_throughput_is_positive_and_counts_only_the_last_window():
    stats = AccumulationStats()
    first, second = run_windows(stats, [1.0, 1.0], accum=2, samples=4, tokens=40)
    for record in (first, second):
        assert record["samples_per_s"] > 0 and record["tokens_per_s"] > 0
        assert record["tokens_per_s"] == pytest.approx(10 * record["samples_per_s"])
    summary = stats.as_dict()
    assert summary["elapsed_s"] > 0
    assert summary["tokens_per_s"] == pytest.approx(stats.tokens_seen / summary["elapsed_s"])


def test_throughput_interval_uses_perf_counter(monkeypatch):
    clock = iter([100.0, 102.0, 103.0])
    monkeypatch.setattr(stats_module.time, "perf_counter", lambda: next(clock))
    stats = AccumulationStats()  # clock starts at 100
    stats.record_micro_batch(samples=8, tokens=80)
    assert stats.record_optimizer_step(1.0)["samples_per_s"] == pytest.approx(4.0)  # 8 in 2 s
    stats.record_micro_batch(samples=8, tokens=80)
    assert stats.record_optimizer_step(1.0)["tokens_per_s"] == pytest.approx(80.0)  # 80 in 1 s
    assert stats.as_dict()["samples_per_s"] == pytest.approx(16 / 3)


def test_peak_memory_on_cpu_reads_resident_memory():
    memory = peak_memory("cpu")
    assert memory["peak_memory_bytes"] > 1 << 20  # a Python process with torch holds more than 1 MiB
    assert "peak_memory_allocated_bytes" not in memory
    record = AccumulationStats().record_optimizer_step(1.0)
    assert record["peak_memory_bytes"] > 0 and record["memory_device"] == "cpu"


def test_peak_memory_of_a_cuda_run_is_the_gpus_not_the_process(monkeypatch):
    """The choice by device, without a GPU: torch.cuda's counters stand in (the GPU bench reads the real ones)."""
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 7 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    assert peak_memory("cuda:0") == {"peak_memory_bytes": 7 * 2**30, "peak_memory_allocated_bytes": 5 * 2**30}
    stats = AccumulationStats(device="cuda:0")
    record = stats.record_optimizer_step(1.0)
    assert (record["peak_memory_bytes"], record["memory_device"]) == (7 * 2**30, "cuda")
    summary = stats.as_dict()
    assert (summary["peak_memory_bytes"], summary["peak_memory_allocated_bytes"]) == (7 * 2**30, 5 * 2**30)


def test_as_dict_has_the_summary_keys_and_is_json():
    stats = AccumulationStats()
    run_windows(stats, [2.0, 1.0])
    stats.record_adjustment(reason="oom", old_micro_batch=8, new_micro_batch=4, old_accum=2, new_accum=4)
    summary = stats.as_dict()
    assert set(summary) >= {
        "micro_step",
        "optimizer_step",
        "samples_seen",
        "tokens_seen",
        "skipped_steps",
        "final_loss",
        "ema_loss",
        "grad_norm_history",
        "elapsed_s",
        "samples_per_s",
        "tokens_per_s",
        "peak_memory_bytes",
        "peak_memory_allocated_bytes",
        "memory_device",
        "adjustments",
    }
    assert summary["final_loss"] == 1.0
    assert summary["adjustments"] == [
        {
            "optimizer_step": 2,
            "micro_step": 4,
            "reason": "oom",
            "old_micro_batch": 8,
            "new_micro_batch": 4,
            "old_accum": 2,
            "new_accum": 4,
        }
    ]
    json.dumps(summary, allow_nan=False)


def test_reset_forgets_everything():
    stats = AccumulationStats()
    run_windows(stats, [2.0, 1.0])
    stats.record_adjustment(reason="oom")
    stats.reset()
    fresh = AccumulationStats().as_dict()
    summary = stats.as_dict()
    for key in ("micro_step", "optimizer_step", "samples_seen", "tokens_seen", "final_loss", "ema_loss"):
        assert summary[key] == fresh[key]
    assert summary["grad_norm_history"] == [] and summary["adjustments"] == [] and summary["elapsed_s"] == 0


def test_state_round_trip_continues_like_an_uninterrupted_run():
    uninterrupted = AccumulationStats(ema_beta=0.8)
    run_windows(uninterrupted, [3.0, 2.0, 1.0, 0.5])

    before = AccumulationStats(ema_beta=0.8)
    run_windows(before, [3.0, 2.0])
    before.record_adjustment(reason="oom", new_micro_batch=2)
    resumed = AccumulationStats()
    resumed.load_state_dict(json.loads(json.dumps(before.state_dict())))
    assert resumed.as_dict()["adjustments"] == before.as_dict()["adjustments"]
    records = []
    for i, loss in enumerate([1.0, 0.5], start=2):
        for _ in range(2):
            resumed.record_micro_batch(samples=4, tokens=40)
        records.append(resumed.record_optimizer_step(loss, grad_norm=0.5 + i, lr=1e-3))

    a, b = uninterrupted.as_dict(), resumed.as_dict()
    for key in (
        "micro_step",
        "optimizer_step",
        "samples_seen",
        "tokens_seen",
        "final_loss",
        "grad_norm_history",
    ):
        assert a[key] == b[key]
    assert b["ema_loss"] == pytest.approx(a["ema_loss"])
    assert records[-1]["samples_per_s"] > 0  # the clock restarted on load


def test_bad_state_and_beta_raise():
    with pytest.raises(ValueError):
        AccumulationStats(ema_beta=1.0)
    with pytest.raises(ValueError):
        AccumulationStats().load_state_dict({"version": 99})
