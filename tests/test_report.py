"""`python -m accum report --run DIR`: the picture of one run (its Figure inspected, not only written) and its CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from accum.cli import report
from accum.cli.main import main


def write_run(out: Path, steps: int = 12, noise: bool = True, finished: bool = True) -> Path:
    """A run's files as train.py writes them: 12 steps, the batch doubled after step 6 by a schedule, the
    micro-batch halved at step 4 by an out-of-memory replay, B_simple known from step 10."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"task": "classification", "loss_normalization": "auto",
                                                 "optimizer": "adamw", "lr": 1e-3, "lr_scheduler": "linear"}))
    (out / "plan.json").write_text(json.dumps({"micro_batch_size": 2, "accumulation_steps": 8, "num_processes": 1,
                                               "effective_batch_size": 16, "target_batch_size": 16}))
    records, samples = [], 0
    for step in range(1, steps + 1):
        batch, micro = (8 if step <= 6 else 16), (4 if step < 4 else 2)
        samples += batch
        records.append({"optimizer_step": step, "micro_step": step * 4, "loss": 2.0 - 0.05 * step + 0.03 * (step % 2),
                        "ema_loss": 2.0 - 0.04 * step, "lr": 1e-3 * (1 - step / 13), "grad_norm": 1.0 + 0.1 * (step % 3),
                        "samples_seen": samples, "tokens_seen": samples * 20, "tokens_per_s": 900.0 + 10 * step,
                        "samples_per_s": 45.0, "peak_memory_bytes": (500 + step) * 2**20, "memory_device": "cpu",
                        "epoch": 0, "skipped": False, "effective_batch_size": batch, "micro_batch_size": micro,
                        "gradient_accumulation_steps": batch // micro,
                        "noise_b_simple": 40.0 + step if noise and step >= 10 else None})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        adjustments = [
            {"optimizer_step": 4, "micro_step": 12, "old_micro_batch_size": 4, "new_micro_batch_size": 2,
             "old_accumulation_steps": 2, "new_accumulation_steps": 4, "effective_batch_size": 8,
             "reason": "out of memory in forward/backward"},
            {"optimizer_step": 6, "samples_seen": 48, "old_effective_batch_size": 8, "new_effective_batch_size": 16,
             "old_accumulation_steps": 4, "new_accumulation_steps": 8, "micro_batch_size": 2,
             "reason": "schedule: 48 samples seen"}]
        (out / "metrics.json").write_text(json.dumps({"final_loss": 1.4, "eval": {"loss": 1.5, "accuracy": 0.6},
                                                      "adjustments": adjustments}))
    return out


def figure_of(run: Path):
    records = report.read_records(run)
    metrics = report.read_metrics(run)
    marks = report.marks_of(metrics["adjustments"]) if metrics else report.marks_from_records(records)
    rows = report.rows_of(records, marks)
    return report.build_figure(rows, marks, "test", report.summary_lines({}, {}, metrics, rows)), marks


def test_report_draws_every_curve_over_optimizer_steps_with_the_plan_changes_marked(tmp_path):
    run = write_run(tmp_path / "run")
    fig, marks = figure_of(run)
    assert [(m.optimizer_step, m.kind) for m in marks] == [(4, "memory"), (7, "schedule")]  # first step run with it
    axes = fig.axes
    labels = [ax.get_ylabel() for ax in axes[:7]]
    assert labels == ["training loss", "learning rate", "gradient norm", "batch", "gradient noise scale",
                      "throughput (tokens/s)", "peak memory (MiB)"]
    for ax in axes[:7]:
        assert ax.get_xlabel() == "optimizer step"
        curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]  # the marks are 2-point lines
        assert curves, ax.get_ylabel()
        low, high = ax.get_ylim()
        assert high > low
        vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
        assert sorted(line.get_xdata()[0] for line in vertical) == [4, 7]
    loss, batch, noise = axes[0], axes[3], axes[4]
    assert [line.get_label() for line in loss.get_lines()[2:]] == ["loss per optimizer step", "EMA loss"]
    assert len([line for line in batch.get_lines() if len(line.get_xdata()) > 2]) == 3  # batch, micro, micro-batches
    b_simple = noise.get_lines()[2]
    assert list(b_simple.get_xdata()) == [10, 11, 12]  # known from step 10 on
    assert "schedule: 48 samples seen" in axes[7].texts[0].get_text()


def test_report_command_writes_png_and_csv_and_says_when_the_noise_scale_is_missing(tmp_path, capsys):
    run = write_run(tmp_path / "run", noise=False, finished=False)  # a run still training: no metrics.json
    assert main(["report", "--run", str(run), "--output_dir", str(tmp_path / "out")]) == 0
    png, table = tmp_path / "out" / "report.png", tmp_path / "out" / "report.csv"
    assert capsys.readouterr().out.split() == [str(png), str(table)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(table.open()))
    assert [int(r["optimizer_step"]) for r in rows] == list(range(1, 13))
    assert rows[3]["adjustment"] == "micro-batch 4 -> 2" and rows[6]["adjustment"] == "batch 8 -> 16"
    fig, _ = figure_of(run)
    assert "not measured" in fig.axes[4].texts[0].get_text() and not fig.axes[4].get_lines()[2:]
    assert main(["report", "--run", str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
